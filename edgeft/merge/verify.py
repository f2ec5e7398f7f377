"""Verify a merge: the comparison prompts, the logits of a model on them, the agreement figures
of the merged model against the unmerged one, and the bars those figures are held to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError, one_line
from edgeft.core.records import Check
from edgeft.merge.plan import MergePlan


# Prompts the merged and unmerged models are compared on: plain text and chat turns
# (rendered with the tokenizer's chat template). Every position counts.
PLAIN_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
)
CHAT_PROMPTS = (
    [{"role": "user", "content": "What is the boiling point of water at sea level?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Give me three tips for writing clear code."}],
)

# Bars for agreement with the model as trained. A merge that rebuilds the trained weights
# ("nf4-dequant", or "base" on a 16-bit-trained adapter) must match it up to float rounding.
TOP1_MIN = 0.99
MEAN_KL_MAX = 1e-3
# "base" on a 4-bit-trained adapter puts back the quantization error the adapter never saw, so
# it is held to the scale of that error, measured on the bare base (fp32 vs 4-bit, no adapter).
GAP_TOP1_MARGIN = 0.10  # top-1 >= the gap's top-1 - margin
GAP_KL_FACTOR = 2.0  # mean KL <= factor * the gap's mean KL
# Rounding the weights to the output dtype (compared in fp32) adds this much; measured on
# SmolLM2-135M: bf16 KL 1e-4 and one top-1 flip in 108, fp16 KL 2e-6.
DTYPE_KL_SLACK = {"fp32": 0.0, "fp16": 1e-3, "bf16": 5e-3}
DTYPE_TOP1_SLACK = {"fp32": 0.0, "fp16": 0.02, "bf16": 0.04}
# A reference trained with 16-bit compute (bf16 on GPUs and on CPUs with bf16 instructions)
# carries that rounding in every matmul, while the merged model is compared in fp32. Measured
# on the demo's adapter (bf16 compute, 40 steps): top-1 0.991, mean KL 1.8e-3.
COMPUTE_KL_SLACK = {"float32": 0.0, "float16": 2e-3, "bfloat16": 5e-3}
COMPUTE_TOP1_SLACK = {"float32": 0.0, "float16": 0.01, "bfloat16": 0.02}


@dataclass
class Figures:
    """Agreement figures (``compare_logits`` dicts) gathered while merging; the checks read them."""

    policies: dict[str, dict[str, Any]] = field(default_factory=dict)  # each merged model vs the model as trained
    gap: dict[str, Any] | None = None  # the bare base, fp32 vs 4-bit: the scale for the "base" policy
    merge: dict[str, Any] | None = None  # the written model vs the unmerged adapter on the same weights


def encode_prompts(tok: Any) -> list[Any]:
    """Token ids (1-D LongTensors) of the comparison prompts; chat prompts use the chat template."""
    ids = [tok(p, return_tensors="pt").input_ids[0] for p in PLAIN_PROMPTS]
    if getattr(tok, "chat_template", None):  # a tokenizer without one gets the plain prompts only
        for messages in CHAT_PROMPTS:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids.append(tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0])
    return ids


def prompt_logits(model: Any, prompts: list[Any]) -> Any:
    """Next-token logits at every position of every prompt, as one (N, V) float32 numpy array."""
    import numpy as np
    import torch

    model.eval()
    with torch.inference_mode():
        rows = [model(input_ids=ids[None]).logits[0].float().numpy() for ids in prompts]  # (T, V) each
    return np.concatenate(rows, axis=0)



def prompt_counts(prompts: list[Any]) -> dict[str, int]:
    """How many of ``encode_prompts``' prompts are plain text and how many chat turns."""
    return {"plain": len(PLAIN_PROMPTS), "chat": len(prompts) - len(PLAIN_PROMPTS)}


def compare(ref: Any, other: Any) -> dict[str, Any]:
    """Top-1 agreement and KL of ``other``'s (N, V) logits against ``ref``'s."""
    from edgeft.core.compare import compare_logits

    return compare_logits(ref, other)


def load_merged(directory: Path) -> Any:
    """The written model, read back as a user would (fp32 so only the stored weights differ)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, use_safetensors=True)
    except Exception as e:
        raise EdgeftError(f"the merged model does not load back ({one_line(e)})") from None


def agreement_checks(plan: MergePlan, figures: Figures, bad: list[str]) -> list[Check]:
    """The verdict's checks: every tensor finite, and (when written) agreement within the bars above."""
    checks = [Check("finite", value=not bad, threshold=True, op="==")]
    if figures.merge is None:  # nothing was written: only the finiteness check applies
        return checks
    top1_slack, kl_slack = DTYPE_TOP1_SLACK[plan.dtype], DTYPE_KL_SLACK[plan.dtype]
    if plan.quant is not None and plan.policy == "base":
        assert figures.gap is not None, "the base policy on a 4-bit-trained adapter always measures the gap"
        top1_min = figures.gap["top1_agreement"] - GAP_TOP1_MARGIN
        kl_max = GAP_KL_FACTOR * figures.gap["mean_kl"]
    else:
        top1_min, kl_max = TOP1_MIN, MEAN_KL_MAX
    fig, merge_fig = figures.policies[plan.policy], figures.merge
    compute = plan.quant.compute_dtype if plan.quant is not None else "float32"
    ref_top1_slack = top1_slack + COMPUTE_TOP1_SLACK.get(compute, 0.0)
    ref_kl_slack = kl_slack + COMPUTE_KL_SLACK.get(compute, 0.0)
    return checks + [
        Check("top1_agreement", fig["top1_agreement"], round(top1_min - ref_top1_slack, 4), ">="),
        Check("mean_kl", fig["mean_kl"], float(f"{kl_max + ref_kl_slack:.4g}"), "<="),
        # the merge arithmetic itself: merged vs the unmerged adapter on the very same base weights
        Check("merge_top1_agreement", merge_fig["top1_agreement"], round(TOP1_MIN - top1_slack, 4), ">="),
        Check("merge_mean_kl", merge_fig["mean_kl"], float(f"{MEAN_KL_MAX + kl_slack:.4g}"), "<="),
    ]
