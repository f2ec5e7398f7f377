"""Merge a LoRA adapter into its base model, and verify the merged model against the unmerged one.

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
the measured quantization gap (see ``GAP_*`` below) rather than to exact agreement.

Verification (written to ``OUTPUT/edgeft-verify.json``): every merged tensor is finite; the
merged artifact, reloaded from disk in fp32, agrees with the model as trained (top-1 and mean
KL, thresholds below, per policy and output dtype); and it agrees with the unmerged adapter on
the same base weights (``merge_*`` checks: the merge arithmetic itself is exact). Figures for
both policies are stored when the adapter was trained on a 4-bit base. The 4-bit reference runs
bitsandbytes' training path (dequantize, matmul in the compute dtype), not its CPU inference
kernel, which computes in bf16 and alone differs from training by mean KL 4-5e-4 and flipped
2 of 108 next tokens in the second run above.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from edgeft.errors import ConfigError, EdgeftError
from edgeft.fsutil import atomic_dir, dir_size, ensure_free_space, write_json
from edgeft.models import _one_line, check_weights_safe, load_tokenizer, read_model_config, resolve_model
from edgeft.records import Check, Record, write_record

POLICIES = ("auto", "base", "nf4-dequant")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
BNB_BLOCKSIZE = 64  # transformers' bitsandbytes integration quantizes with Params4bit's default
RUN_FILE = "edgeft-run.json"
PROVENANCE_FILE = "edgeft-merge.json"
RUN_KEYS = ("method", "base_model", "base_model_ref", "quantization", "status", "total_steps")  # copied into it
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# A foreign adapter asked for nf4-dequant: the usual QLoRA recipe (Dettmers et al. 2023).
ASSUMED_QUANT = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32",
                 "quant_storage": "uint8"}

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
# Skip the second policy's figures for models this large (another fp32 copy of the base).
OTHER_POLICY_MAX_PARAMS = 1_500_000_000


@dataclass(frozen=True)
class Quantization:
    """How bitsandbytes held the base model while the adapter was trained."""

    quant_type: str  # "nf4" | "fp4"
    double_quant: bool
    compute_dtype: str  # torch dtype name
    load_dtype: str  # dtype the base weights had when they were quantized
    quant_storage: str = "uint8"
    assumed: bool = False  # True: not recorded anywhere, ASSUMED_QUANT was used

    def bnb_config(self) -> Any:
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.quant_type, bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, self.quant_storage),
        )


@dataclass(frozen=True)
class MergePlan:
    """Everything ``merge_adapter`` needs, validated before any weights are loaded."""

    adapter: Path
    output: Path
    base: str
    policy: str  # effective: "base" | "nf4-dequant"
    requested_policy: str
    dtype: str  # "fp32" | "fp16" | "bf16"
    method: str | None
    quant: Quantization | None  # None: the adapter was trained on a 16-bit base
    tokenizer_dir: str
    adapter_shapes: dict[str, tuple[int, ...]]
    params: int | None  # parameter count of a local base (None for a Hub id)
    run: dict[str, Any] | None
    overwrite: bool

    @property
    def other_policy(self) -> str | None:
        """The policy also measured for comparison (only meaningful for 4-bit-trained adapters)."""
        if self.quant is None:
            return None
        return "base" if self.policy == "nf4-dequant" else "nf4-dequant"

    def provenance(self) -> dict[str, Any]:
        return {
            "adapter": str(self.adapter),
            "base": self.base,
            "policy": self.policy,
            "requested_policy": self.requested_policy,
            "dtype": self.dtype,
            "method": self.method,
            "quantization": asdict(self.quant) if self.quant else None,
            # a few fields of edgeft-run.json, not all: it also holds samples of the training data
            "training_run": {k: self.run[k] for k in RUN_KEYS if k in self.run} if self.run is not None else None,
        }


# ----------------------------------------------------------------------------- entry point


def merge_adapter(adapter: Path, output: Path, *, base: str | None = None, policy: str = "auto",
                  dtype: str = "fp32", overwrite: bool = False) -> Record:
    """Merge the LoRA adapter in ``adapter`` into its base model and write a HF model to ``output``.

    The merged model is verified against the unmerged model as trained; the verdict is written
    to ``output/edgeft-verify.json`` and returned (a failed verification is a record with status
    "failed", not an exception). User errors raise ``EdgeftError``.
    """
    plan = plan_merge(adapter, output, base=base, policy=policy, dtype=dtype, overwrite=overwrite)
    log = _Log()
    with _quiet():
        import torch

        tok = load_tokenizer(plan.tokenizer_dir)
        prompts = encode_prompts(tok)
        trained = _as_trained(plan, prompts, log)

        figures: dict[str, dict[str, Any]] = {}
        gap = None  # the 4-bit quantization gap of the bare base: scale for the "base" policy
        if plan.other_policy and (plan.params or 0) <= OTHER_POLICY_MAX_PARAMS:
            with log.step(f"measuring the {plan.other_policy} policy for comparison"):
                other = _merge(plan, plan.other_policy, trained, prompts)
                figures[plan.other_policy] = _compare(trained.logits, prompt_logits(other.model, prompts))
                if other.bare_logits is not None:
                    gap = _compare(other.bare_logits, trained.bare_logits)
                del other
                gc.collect()

        with log.step(f"merging with policy {plan.policy}"):
            merged = _merge(plan, plan.policy, trained, prompts)
            if merged.bare_logits is not None:
                gap = _compare(merged.bare_logits, trained.bare_logits)
            model = merged.model.to(getattr(torch, DTYPES[plan.dtype]))
            bad = nonfinite_tensors(model.state_dict())

        sizes = {"adapter_bytes": dir_size(plan.adapter / ADAPTER_WEIGHTS)}
        with atomic_dir(plan.output, overwrite=plan.overwrite) as tmp:
            write_json(tmp / PROVENANCE_FILE, plan.provenance())
            merge_fig = None
            if not bad:  # non-finite weights are never written: only the failed record is
                with log.step(f"writing {plan.output}"):
                    _save(model, tok, tmp)
                sizes["merged_bytes"] = sum(dir_size(f) for f in tmp.glob("*.safetensors"))
                with log.step("verifying the written model against the unmerged model"):
                    artifact_logits = prompt_logits(_load_merged(tmp), prompts)
                figures[plan.policy] = _compare(trained.logits, artifact_logits)
                merge_fig = _compare(merged.unmerged_logits, artifact_logits)
            del merged, model
            gc.collect()
            extra = {"prompts": {"plain": len(PLAIN_PROMPTS), "chat": len(prompts) - len(PLAIN_PROMPTS)},
                     "quantized_layers": len(trained.quantized), "sizes": sizes}
            record = _record(plan, figures, merge_fig, gap, bad, extra)
            write_record(tmp, record)
    log.table(plan, figures)
    return record


# ----------------------------------------------------------------------------- plan (no weights)


def plan_merge(adapter: Path, output: Path, *, base: str | None, policy: str, dtype: str,
               overwrite: bool) -> MergePlan:
    """Validate the inputs and decide what to do; reads only small files."""
    problems = []
    if policy not in POLICIES:
        problems.append(f"--policy {policy}: expected one of {', '.join(POLICIES)}")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if problems:
        raise ConfigError("; ".join(problems))

    adapter, output = Path(adapter).expanduser().resolve(), Path(output).expanduser().absolute()
    adapter_cfg = _read_adapter_config(adapter)
    shapes = _read_adapter_weights(adapter)
    run = _read_run(adapter)
    if output.exists() and not overwrite:
        raise EdgeftError(f"--output {output} already exists; pass --overwrite to replace it")
    if output.resolve() == adapter or adapter.is_relative_to(output.resolve()):
        raise EdgeftError(f"--output {output} would replace the adapter it is made from; choose another directory")

    quant = _training_quantization(run, adapter, policy)
    effective = policy if policy != "auto" else ("nf4-dequant" if quant is not None else "base")
    if effective == "nf4-dequant" and quant is None:
        quant = Quantization(**_quant_fields(ASSUMED_QUANT, load_dtype="float32"), assumed=True)
    base_dir = _resolve_base(base, run, adapter_cfg, adapter)
    check_weights_safe(base_dir)
    _check_base_family(base_dir, adapter_cfg, adapter)
    tokenizer_dir = str(adapter) if any((adapter / f).is_file() for f in _TOKENIZER_FILES) else base_dir

    params = _param_count(base_dir)
    if params:
        # merged weights + one temp copy of the tokenizer and configs (a few MiB)
        ensure_free_space(output, params * _dtype_bytes(dtype) + 64 * 2**20, "the merged model")
    return MergePlan(
        adapter=adapter, output=output, base=base_dir, policy=effective, requested_policy=policy, dtype=dtype,
        method=(run or {}).get("method") or None, quant=quant, tokenizer_dir=tokenizer_dir,
        adapter_shapes=shapes, params=params, run=run, overwrite=overwrite,
    )


def _read_adapter_config(adapter: Path) -> dict[str, Any]:
    if not adapter.is_dir():
        raise EdgeftError(f"--adapter {adapter}: directory not found")
    path = adapter / ADAPTER_CONFIG
    if not path.is_file():
        raise EdgeftError(f"--adapter {adapter}: not a PEFT adapter ({ADAPTER_CONFIG} missing)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise EdgeftError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise EdgeftError(f"{path}: peft_type {kind!r}; only LoRA adapters (peft_type LORA) can be merged")
    return cfg


def _read_adapter_weights(adapter: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the adapter tensors; the file is read through once so a damaged one fails here."""
    path = adapter / ADAPTER_WEIGHTS
    if not path.is_file():
        other = " (only pickle weights found; edgeft loads safetensors only)" if (adapter / "adapter_model.bin").is_file() else ""
        raise EdgeftError(f"--adapter {adapter}: {ADAPTER_WEIGHTS} missing{other}")
    from safetensors import safe_open

    try:
        shapes = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_tensor(key).shape)
    except Exception as e:  # safetensors raises its own error type, and OSError for short reads
        raise EdgeftError(f"{path}: unreadable or truncated safetensors file ({_one_line(e)}); re-run training or re-copy it") from None
    if not any(".lora_A." in k for k in shapes):
        raise EdgeftError(f"{path}: holds no LoRA weights (no lora_A tensors)")
    return shapes


def _read_run(adapter: Path) -> dict[str, Any] | None:
    from runtime.artifacts import read_run

    run = read_run(adapter)
    if not run:
        return None
    if run.get("status") == "running":  # `edgeft train` writes the adapter only when it completes
        raise EdgeftError(f"--adapter {adapter}: training has not completed ({RUN_FILE} status running); "
                          "finish it with `edgeft train ... --resume`")
    return run


def _quant_fields(q: dict[str, Any], *, load_dtype: str) -> dict[str, Any]:
    compute = str(q.get("compute_dtype") or "float32").replace("torch.", "")
    return {
        "quant_type": str(q.get("quant_type") or "nf4"),
        "double_quant": bool(q.get("double_quant", True)),
        "compute_dtype": compute,
        "load_dtype": load_dtype or compute,
        "quant_storage": str(q.get("quant_storage") or "uint8").replace("torch.", ""),
    }


def _training_quantization(run: dict[str, Any] | None, adapter: Path, policy: str) -> Quantization | None:
    """The 4-bit setup the adapter was trained with, from edgeft-run.json (None: 16-bit base)."""
    if run is None:
        return None
    q = run.get("quantization")
    if not q:
        if policy == "nf4-dequant":
            raise EdgeftError(
                f"--policy nf4-dequant: {adapter / RUN_FILE} says the adapter was trained without "
                "quantization, so there is no 4-bit round trip to reproduce; use --policy base"
            )
        return None
    if not isinstance(q, dict) or not q.get("load_in_4bit"):
        raise EdgeftError(f"{adapter / RUN_FILE}: quantization {q!r} is not a 4-bit bitsandbytes setup; only 4-bit is supported")
    # The weights are quantized in the dtype the base was loaded in (fp32 and bf16 round trips
    # differ); edgeft loads the base in the compute dtype unless the run says otherwise.
    load_dtype = str(run.get("torch_dtype") or run.get("dtype") or "").replace("torch.", "")
    fields = _quant_fields(q, load_dtype=load_dtype)
    problems = []
    if int(q.get("blocksize") or BNB_BLOCKSIZE) != BNB_BLOCKSIZE:
        problems.append(f"blocksize {q.get('blocksize')} (transformers quantizes with {BNB_BLOCKSIZE})")
    if fields["quant_type"] not in {"nf4", "fp4"}:
        problems.append(f"quant_type {fields['quant_type']!r} (expected nf4 or fp4)")
    for key in ("compute_dtype", "load_dtype"):
        if fields[key] not in DTYPES.values():
            problems.append(f"{key} {fields[key]!r} (expected one of {', '.join(DTYPES.values())})")
    if problems:
        raise EdgeftError(f"{adapter / RUN_FILE}: quantization: " + "; ".join(problems))
    return Quantization(**fields)


def _resolve_base(base: str | None, run: dict[str, Any] | None, adapter_cfg: dict[str, Any], adapter: Path) -> str:
    if base:
        return resolve_model(base, flag="--base")
    recorded = (run or {}).get("base_model")
    source = f"{adapter / RUN_FILE} base_model"
    if not recorded:
        recorded, source = adapter_cfg.get("base_model_name_or_path"), f"{adapter / ADAPTER_CONFIG} base_model_name_or_path"
    if not recorded:
        raise EdgeftError(f"--adapter {adapter}: no base model recorded with the adapter; pass --base")
    try:
        return resolve_model(recorded, flag="--base")
    except EdgeftError as e:
        raise EdgeftError(f"base model from {source} is not usable ({e.format_message()}); pass --base") from None


def _check_base_family(base: str, adapter_cfg: dict[str, Any], adapter: Path) -> None:
    """Refuse an adapter for another architecture before loading anything (shapes come later)."""
    base_cfg = read_model_config(base)
    recorded = adapter_cfg.get("base_model_name_or_path")
    if not base_cfg or not recorded:
        return
    rec_cfg = read_model_config(recorded) if Path(recorded).is_dir() else {}
    a, b = rec_cfg.get("model_type"), base_cfg.get("model_type")
    if a and b and a != b:
        raise EdgeftError(f"--adapter {adapter} was trained on a {a} model ({recorded}); the base {base} is {b}; pass the right --base")


def _param_count(base: str) -> int | None:
    """Parameter count from the safetensors headers of a local base (no tensor data read)."""
    files = sorted(Path(base).glob("*.safetensors")) if Path(base).is_dir() else []
    if not files:
        return None
    import math

    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


# ----------------------------------------------------------------------------- quantization round trip


def quantize_dequantize(weight: Any, quant: Quantization) -> Any:
    """``weight`` after the 4-bit round trip bitsandbytes applied in training, as float32.

    The weight is cast to the dtype the base was loaded in first: Params4bit quantizes the
    tensor it is given, and fp32 and bf16 inputs round to different 4-bit codes.
    """
    import bitsandbytes.functional as bnbf
    import torch

    w = weight.detach().to(device="cpu", dtype=getattr(torch, quant.load_dtype)).contiguous()
    packed, state = bnbf.quantize_4bit(
        w, blocksize=BNB_BLOCKSIZE, compress_statistics=quant.double_quant, quant_type=quant.quant_type,
        quant_storage=getattr(torch, quant.quant_storage),
    )
    return bnbf.dequantize_4bit(packed, state).to(torch.float32)


def apply_quantization_round_trip(model: Any, module_names: set[str], quant: Quantization) -> None:
    """Replace the weights of the named Linear modules by their 4-bit round trip (in place)."""
    import torch

    modules = dict(model.named_modules())
    missing = sorted(module_names - modules.keys())
    assert not missing, f"4-bit modules absent from the fp32 model: {missing[:3]}"
    with torch.no_grad():
        for name in sorted(module_names):
            layer = modules[name]
            layer.weight.copy_(quantize_dequantize(layer.weight, quant))


# ----------------------------------------------------------------------------- models and logits


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


def _compare(ref: Any, other: Any) -> dict[str, Any]:
    from runtime.metrics import compare_logits

    return compare_logits(ref, other)


def _load_base(plan: MergePlan, **kwargs: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.float32)
    try:
        return AutoModelForCausalLM.from_pretrained(plan.base, use_safetensors=True, trust_remote_code=False, **kwargs)
    except Exception as e:  # OSError, ValueError, RuntimeError, ImportError ... all mean "cannot load"
        raise EdgeftError(f"base model {plan.base}: cannot load ({_one_line(e)})") from None


def _check_adapter_fits(model: Any, plan: MergePlan) -> None:
    """Compare the adapter's LoRA shapes with the base's Linear layers; one clear error if they differ."""
    modules = dict(model.named_modules())
    for key, shape in sorted(plan.adapter_shapes.items()):
        for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not key.endswith(part):
                continue
            name = key[: -len(part)].removeprefix("base_model.model.")
            layer = modules.get(name)
            if layer is None:
                raise EdgeftError(f"--adapter {plan.adapter} does not fit base {plan.base}: it adapts layer {name}, which the base lacks")
            # Linear (also bitsandbytes' Linear4bit, whose weight is packed): lora_A is (r, in_features),
            # lora_B is (out_features, r). Other layer kinds (embeddings): peft checks them when loading.
            feature = "in_features" if dim == 1 else "out_features"
            want = getattr(layer, feature, None)
            if want is not None and shape[dim] != want:
                raise EdgeftError(
                    f"--adapter {plan.adapter} does not fit base {plan.base}: layer {name} has "
                    f"{feature}={want} in the base, the adapter expects {shape[dim]}"
                )


def _attach_adapter(model: Any, plan: MergePlan) -> Any:
    from peft import PeftModel

    _check_adapter_fits(model, plan)
    try:
        peft_model = PeftModel.from_pretrained(model, str(plan.adapter), is_trainable=False)
    except Exception as e:  # peft raises RuntimeError (size mismatch), ValueError (targets), KeyError
        raise EdgeftError(f"--adapter {plan.adapter} does not fit base {plan.base}: {_one_line(e)}") from None
    return peft_model.eval()


class AsTrained(NamedTuple):
    """The unmerged model as trained, seen through the comparison prompts."""

    logits: Any  # (N, V): base as trained + adapter
    bare_logits: Any | None  # (N, V): the 4-bit base alone (None for 16-bit training)
    quantized: set[str]  # Linear layers bitsandbytes held in 4 bits


class Merged(NamedTuple):
    model: Any  # merged fp32 model
    unmerged_logits: Any  # (N, V): adapter not merged, on the same base weights
    bare_logits: Any | None  # (N, V): the fp32 base alone, when asked for


def _as_trained(plan: MergePlan, prompts: list[Any], log: _Log) -> AsTrained:
    """Run the unmerged model as it was trained.

    For a 4-bit-trained adapter this is the real bitsandbytes 4-bit base plus the adapter; the
    layers transformers converts to 4 bits there are the ones ``nf4-dequant`` round-trips.
    For a 16-bit-trained adapter it is the fp32 base plus the adapter.
    """
    if plan.quant is None:
        with log.step("running the unmerged model (fp32 base + adapter)"):
            model = _attach_adapter(_load_base(plan), plan)
            result = AsTrained(prompt_logits(model, prompts), None, set())
        del model
        gc.collect()
        return result

    import bitsandbytes as bnb
    import torch
    from peft import prepare_model_for_kbit_training

    what = "assumed NF4 + double quant" if plan.quant.assumed else plan.quant.quant_type.upper()
    with log.step(f"running the unmerged model as trained (4-bit {what} base + adapter)"):
        # device_map: transformers would put a 4-bit model on a GPU when it sees one; merging is CPU work.
        model = _load_base(plan, dtype=getattr(torch, plan.quant.load_dtype), quantization_config=plan.quant.bnb_config(),
                           device_map={"": "cpu"})
        quantized = {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        if not quantized:
            raise EdgeftError(f"base model {plan.base}: bitsandbytes quantized no layer, so 4-bit training cannot be reproduced")
        # As `edgeft train` (and the usual QLoRA recipe) did: 16-bit non-4-bit weights go to fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for m in model.modules():
            # bitsandbytes' CPU inference kernel (AVX512-BF16) casts activations to bf16, while
            # training computes in compute_dtype through dequantize + matmul: keep training's path.
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        bare = prompt_logits(model, prompts)
        model = _attach_adapter(model, plan)
        result = AsTrained(prompt_logits(model, prompts), bare, quantized)
    del model
    gc.collect()
    return result


def _merge(plan: MergePlan, policy: str, trained: AsTrained, prompts: list[Any]) -> Merged:
    """Merge with ``policy`` in fp32; for "base" on a 4-bit-trained adapter also run the bare base."""
    model = _load_base(plan)
    bare = prompt_logits(model, prompts) if policy == "base" and trained.bare_logits is not None else None
    if policy == "nf4-dequant":
        apply_quantization_round_trip(model, trained.quantized, plan.quant)
    peft_model = _attach_adapter(model, plan)
    unmerged = prompt_logits(peft_model, prompts)
    return Merged(peft_model.merge_and_unload(), unmerged, bare)


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the tensors in ``state`` holding NaN or inf."""
    import torch

    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _save(model: Any, tok: Any, directory: Path) -> None:
    """A standard HF model directory: safetensors, config, generation config, tokenizer, chat template."""
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)


def _load_merged(directory: Path) -> Any:
    """The written model, read back as a user would (fp32 so only the stored weights differ)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, use_safetensors=True)
    except Exception as e:
        raise EdgeftError(f"the merged model does not load back ({_one_line(e)})") from None


# ----------------------------------------------------------------------------- verdict


def _record(plan: MergePlan, figures: dict[str, dict[str, Any]], merge_fig: dict[str, Any] | None,
            gap: dict[str, Any] | None, bad: list[str], extra: dict[str, Any]) -> Record:
    """The verdict: checks against the bars above, figures and provenance as metrics."""
    checks = [Check("finite", value=not bad, threshold=True, op="==")]
    if merge_fig is not None:
        top1_slack, kl_slack = DTYPE_TOP1_SLACK[plan.dtype], DTYPE_KL_SLACK[plan.dtype]
        if plan.quant is not None and plan.policy == "base":
            assert gap is not None, "the base policy on a 4-bit-trained adapter always measures the gap"
            top1_min = gap["top1_agreement"] - GAP_TOP1_MARGIN
            kl_max = GAP_KL_FACTOR * gap["mean_kl"]
        else:
            top1_min, kl_max = TOP1_MIN, MEAN_KL_MAX
        fig = figures[plan.policy]
        compute = plan.quant.compute_dtype if plan.quant is not None else "float32"
        ref_top1_slack = top1_slack + COMPUTE_TOP1_SLACK.get(compute, 0.0)
        ref_kl_slack = kl_slack + COMPUTE_KL_SLACK.get(compute, 0.0)
        checks += [
            Check("top1_agreement", fig["top1_agreement"], round(top1_min - ref_top1_slack, 4), ">="),
            Check("mean_kl", fig["mean_kl"], float(f"{kl_max + ref_kl_slack:.4g}"), "<="),
            # the merge arithmetic itself: merged vs the unmerged adapter on the very same base weights
            Check("merge_top1_agreement", merge_fig["top1_agreement"], round(TOP1_MIN - top1_slack, 4), ">="),
            Check("merge_mean_kl", merge_fig["mean_kl"], float(f"{MEAN_KL_MAX + kl_slack:.4g}"), "<="),
        ]
    if plan.quant is None:
        reference = "fp32 base + adapter, unmerged"
    else:
        reference = f"4-bit {plan.quant.quant_type} base (bitsandbytes) + adapter, unmerged"
    metrics: dict[str, Any] = {
        "policy": plan.policy,
        "requested_policy": plan.requested_policy,
        "dtype": plan.dtype,
        "base": plan.base,
        "method": plan.method,
        "quantization": asdict(plan.quant) if plan.quant else None,
        "quantization_assumed": bool(plan.quant and plan.quant.assumed),
        "as_trained_reference": reference,
        "compare_compute_dtype": "float32",
        "policies": figures,
        "quantization_gap": gap,
        "merge_vs_unmerged_same_weights": merge_fig,
        **extra,
    }
    if plan.quant is not None and plan.quant.assumed:
        metrics["assumption"] = (
            "no edgeft-run.json: the adapter is assumed to have been trained on an NF4, double-quant, "
            "fp32-compute 4-bit base"
        )
    if bad:
        metrics["nonfinite_tensors"] = bad[:20]
    return Record(artifact=str(plan.output), kind="merged", reference=str(plan.adapter), checks=checks, metrics=metrics)


# ----------------------------------------------------------------------------- output helpers


class _Log:
    """Stage lines on stderr (a spinner on a terminal) and the final comparison table."""

    def __init__(self) -> None:
        from edgeft.progress import console

        self.console = console

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        from edgeft.progress import say

        start = time.perf_counter()
        with self.console.status(f"merge: {what} ..."):
            yield
        say(f"merge: {what} ({time.perf_counter() - start:.1f} s)")

    def table(self, plan: MergePlan, figures: dict[str, dict[str, Any]]) -> None:
        from rich.table import Table

        if not figures:
            return
        table = Table(title="merged (fp32 compute) vs the unmerged model as trained", title_justify="left")
        for col in ("policy", "top-1 agreement", "mean KL", "max KL", "positions"):
            table.add_column(col, justify="left" if col == "policy" else "right")
        for policy, fig in figures.items():
            mark = " (written)" if policy == plan.policy else ""
            table.add_row(policy + mark, f"{fig['top1_agreement']:.4f}", f"{fig['mean_kl']:.3g}",
                          f"{fig['max_kl']:.3g}", str(fig["positions"]))
        self.console.print(table)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence library chatter (advisories, deprecations, bitsandbytes' optional-kernel notice)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()  # configures transformers' root logger now, so the level set below sticks
    loggers = [logging.getLogger(n) for n in ("transformers", "peft", "bitsandbytes", "accelerate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
