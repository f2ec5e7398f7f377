"""Merge a LoRA adapter into its base model, and verify the merged model against the unmerged one.

The modules follow a merge: ``plan`` (inputs checked and choices made before any weights are
loaded), ``weights`` (base, 4-bit round trip, adapter, merge, save), ``verify`` (prompts, figures,
bars), ``record`` (the verdict); ``merge`` runs them in order (``merge_adapter``) and ``log``
shows the stages.

Weights are never merged into 4-bit tensors. Two policies say which 16/32-bit weights the LoRA
delta (``B @ A * scaling``) is added to:

- ``base``: the original base weights, as stored in the base model's safetensors.
- ``nf4-dequant``: the base weights after the round trip the adapter was trained through:
  every Linear layer that bitsandbytes held in 4 bits during training is quantized with
  ``bitsandbytes.functional.quantize_4bit`` (same quant type, blocksize 64, double quant) and
  dequantized back, so the merged model carries the weights the adapter actually saw.
  Embeddings, norms and ``lm_head`` (transformers keeps it out of 4-bit) stay as they are.

``auto`` picks ``nf4-dequant`` for an adapter trained on a 4-bit base (``edgeft-run.json``
records the quantization) and ``base`` otherwise, including for foreign adapters whose
training quantization is unknown.

Measurement behind the default (``benchmarks/merge_policy.py --threads 1``): SmolLM2-135M-Instruct
(fp32), QLoRA as ``edgeft train`` does it on CPU (NF4, double quant, fp32 compute), r=8 on all
linear layers, 30 AdamW steps (lr 1e-3, batch 1) on SST-2 chat turns. Every merged model, reloaded from
disk and computed in fp32, is compared with the model as trained (4-bit base + adapter,
unmerged) at all 108 positions of 5 prompts (3 plain, 2 chat-formatted):

    policy       weights  top-1 agreement  mean KL (nats)  max KL
    nf4-dequant  fp32     1.000            6.9e-12         6.0e-11
    nf4-dequant  fp16     1.000            2.0e-06         2.3e-05
    nf4-dequant  bf16     0.991            9.8e-05         1.6e-03
    base         fp32     0.796            0.332           3.66
    base         bf16     0.796            0.333           3.63
    scale: the adapter moved the 4-bit model by top-1 0.491 / mean KL 4.18; the bare base's
    4-bit gap (fp32 vs NF4, no adapter) is top-1 0.657 / mean KL 0.807.
    a gentler adapter (--lr 2e-4; moved the model by top-1 0.722 / KL 1.15), fp32 weights:
    nf4-dequant 1.000 / 1.1e-11, base 0.741 / 0.424.

``nf4-dequant`` reproduces the trained model up to float rounding; ``base`` puts back the
quantization error the adapter never saw and changes one next token in five. So ``auto``
chooses ``nf4-dequant`` for adapters trained on a 4-bit base. ``base`` stays available for
those who want the original weights under the adapter; its verification bar is scaled to
the measured quantization gap (see ``GAP_*`` in ``verify``) rather than to exact agreement.

Verification (written to ``OUTPUT/edgeft-verify.json``): every merged tensor is finite; the
merged artifact, reloaded from disk in fp32, agrees with the model as trained (top-1 and mean
KL, thresholds in ``verify``, per policy and output dtype); and it agrees with the unmerged
adapter on the same base weights (``merge_*`` checks: the merge arithmetic itself is exact). Figures for
both policies are stored when the adapter was trained on a 4-bit base. The 4-bit reference runs
bitsandbytes' training path (dequantize, matmul in the compute dtype), not its CPU inference
kernel, which computes in bf16 and alone differs from training by mean KL 4-5e-4 and flipped
2 of 108 next tokens in the second run above.
"""

from __future__ import annotations

# The names below were public when edgeft.merge was one module; the CLI, the pipeline, tests and
# benchmarks import them from here.
from edgeft.merge.merge import OTHER_POLICY_MAX_PARAMS, merge_adapter
from edgeft.merge.plan import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ASSUMED_QUANT,
    BNB_BLOCKSIZE,
    DTYPES,
    POLICIES,
    PROVENANCE_FILE,
    RUN_FILE,
    RUN_KEYS,
    MergePlan,
    Quantization,
    plan_merge,
)
from edgeft.merge.verify import (
    CHAT_PROMPTS,
    COMPUTE_KL_SLACK,
    COMPUTE_TOP1_SLACK,
    DTYPE_KL_SLACK,
    DTYPE_TOP1_SLACK,
    GAP_KL_FACTOR,
    GAP_TOP1_MARGIN,
    MEAN_KL_MAX,
    PLAIN_PROMPTS,
    TOP1_MIN,
    encode_prompts,
    prompt_logits,
)
from edgeft.merge.weights import AsTrained, Merged, apply_quantization_round_trip, nonfinite_tensors, quantize_dequantize

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ASSUMED_QUANT", "BNB_BLOCKSIZE", "CHAT_PROMPTS", "COMPUTE_KL_SLACK",
    "COMPUTE_TOP1_SLACK", "DTYPES", "DTYPE_KL_SLACK", "DTYPE_TOP1_SLACK", "GAP_KL_FACTOR", "GAP_TOP1_MARGIN",
    "MEAN_KL_MAX", "OTHER_POLICY_MAX_PARAMS", "PLAIN_PROMPTS", "POLICIES", "PROVENANCE_FILE", "RUN_FILE", "RUN_KEYS",
    "TOP1_MIN", "AsTrained", "Merged", "MergePlan", "Quantization", "apply_quantization_round_trip", "encode_prompts",
    "merge_adapter", "nonfinite_tensors", "plan_merge", "prompt_logits", "quantize_dequantize",
]
