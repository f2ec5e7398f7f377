"""The weights of a merge: the base loaded in fp32 or as bitsandbytes held it in training, its
4-bit round trip (``nf4-dequant``), the adapter attached and merged, finiteness, and saving.

Weights are never merged into 4-bit tensors: the LoRA delta is added to fp32 copies.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, NamedTuple

from edgeft.core.errors import EdgeftError, one_line
from edgeft.merge.log import MergeLog
from edgeft.merge.plan import BNB_BLOCKSIZE, MergePlan, Quantization
from edgeft.merge.verify import prompt_logits


class AsTrained(NamedTuple):
    """The unmerged model as trained, seen through the comparison prompts."""

    logits: Any  # (N, V): base as trained + adapter
    bare_logits: Any | None  # (N, V): the 4-bit base alone (None for 16-bit training)
    quantized: set[str]  # Linear layers bitsandbytes held in 4 bits


class Merged(NamedTuple):
    """An adapter merged into fp32 base weights, and the logits measured on the way."""

    model: Any  # merged fp32 model
    unmerged_logits: Any  # (N, V): adapter not merged, on the same base weights
    bare_logits: Any | None  # (N, V): the fp32 base alone, when asked for


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


def load_base(plan: MergePlan, **kwargs: Any) -> Any:
    """The base model (fp32 unless ``kwargs`` say otherwise); one clear error if it cannot load."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.float32)
    try:
        return AutoModelForCausalLM.from_pretrained(plan.base, use_safetensors=True, trust_remote_code=False, **kwargs)
    except Exception as e:  # OSError, ValueError, RuntimeError, ImportError ... all mean "cannot load"
        raise EdgeftError(f"base model {plan.base}: cannot load ({one_line(e)})") from None


def _load_4bit_as_trained(plan: MergePlan) -> tuple[Any, set[str]]:
    """The base as bitsandbytes held it in training, and the names of its 4-bit Linear layers."""
    import bitsandbytes as bnb
    import torch
    from peft import prepare_model_for_kbit_training

    assert plan.quant is not None, "only a 4-bit-trained adapter has a 4-bit base to load"
    # device_map: transformers would put a 4-bit model on a GPU when it sees one; merging is CPU work.
    model = load_base(plan, dtype=getattr(torch, plan.quant.load_dtype), quantization_config=plan.quant.bnb_config(),
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
    return model, quantized


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



def attach_adapter(model: Any, plan: MergePlan) -> Any:
    """``model`` with the adapter attached (unmerged, eval mode), after checking that it fits."""
    from peft import PeftModel

    _check_adapter_fits(model, plan)
    try:
        peft_model = PeftModel.from_pretrained(model, str(plan.adapter), is_trainable=False)
    except Exception as e:  # peft raises RuntimeError (size mismatch), ValueError (targets), KeyError
        raise EdgeftError(f"--adapter {plan.adapter} does not fit base {plan.base}: {one_line(e)}") from None
    return peft_model.eval()


def run_as_trained(plan: MergePlan, prompts: list[Any], log: MergeLog) -> AsTrained:
    """Run the unmerged model as it was trained.

    For a 4-bit-trained adapter this is the real bitsandbytes 4-bit base plus the adapter; the
    layers transformers converts to 4 bits there are the ones ``nf4-dequant`` round-trips.
    For a 16-bit-trained adapter it is the fp32 base plus the adapter.
    """
    if plan.quant is None:
        with log.step("running the unmerged model (fp32 base + adapter)"):
            model = attach_adapter(load_base(plan), plan)
            result = AsTrained(prompt_logits(model, prompts), None, set())
    else:
        what = "assumed NF4 + double quant" if plan.quant.assumed else plan.quant.quant_type.upper()
        with log.step(f"running the unmerged model as trained (4-bit {what} base + adapter)"):
            model, quantized = _load_4bit_as_trained(plan)
            bare = prompt_logits(model, prompts)
            model = attach_adapter(model, plan)
            result = AsTrained(prompt_logits(model, prompts), bare, quantized)
    del model
    gc.collect()
    return result


def merge_with_policy(plan: MergePlan, policy: str, trained: AsTrained, prompts: list[Any]) -> Merged:
    """Merge with ``policy`` in fp32; for "base" on a 4-bit-trained adapter also run the bare base."""
    model = load_base(plan)
    bare = prompt_logits(model, prompts) if policy == "base" and trained.bare_logits is not None else None
    if policy == "nf4-dequant":
        apply_quantization_round_trip(model, trained.quantized, plan.quant)
    peft_model = attach_adapter(model, plan)
    unmerged = prompt_logits(peft_model, prompts)
    return Merged(peft_model.merge_and_unload(), unmerged, bare)


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the tensors in ``state`` holding NaN or inf."""
    import torch

    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_merged(model: Any, tok: Any, directory: Path) -> None:
    """A standard HF model directory: safetensors, config, generation config, tokenizer, chat template."""
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
