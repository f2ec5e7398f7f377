"""Which linear layers LoRA adapts, per architecture: ``--target-modules all-linear|attention|mlp|NAMES``.

One row per ``model_type``. Phi-3 fuses its projections (``qkv_proj``, ``gate_up_proj``), so the
names that work on Llama do not exist there; ``attention`` and ``mlp`` name the right ones for
each architecture, and a name the model lacks is refused with the names it has.
"""

from __future__ import annotations

from typing import Any

from edgeft.core.errors import ConfigError

_SPLIT = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
_FUSED = {"attention": ("qkv_proj", "o_proj"), "mlp": ("gate_up_proj", "down_proj")}

# model_type -> {group: module names} (transformers' modeling_<type>.py attention and MLP classes)
LORA_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _SPLIT,  # Llama 2/3/3.2, SmolLM/SmolLM2, TinyLlama
    "mistral": _SPLIT,
    "qwen2": _SPLIT,  # Qwen2/Qwen2.5 (q/k/v carry biases; LoRA leaves them alone)
    "qwen3": _SPLIT,
    "smollm3": _SPLIT,
    "gemma3_text": _SPLIT,  # Gemma3ForCausalLM (270M, 1B)
    "phi3": _FUSED,  # Phi-3, Phi-3.5, Phi-4-mini
}
GROUPS = ("attention", "mlp")


def resolve_targets(spec: str, model: Any) -> Any:
    """``--target-modules`` as peft takes it, checked against the modules ``model`` has."""
    if spec == "all-linear":
        return "all-linear"
    model_type = getattr(model.config, "model_type", "?")
    have = linear_names(model)
    names: list[str] = []
    for part in (t.strip() for t in spec.split(",") if t.strip()):
        if part in GROUPS:
            if model_type not in LORA_TARGETS:
                raise ConfigError(f"--target-modules {spec}: no '{part}' group known for model type {model_type}; "
                                  f"name the layers ({', '.join(sorted(have))}) or use all-linear")
            names += LORA_TARGETS[model_type][part]
        elif part not in have:
            raise ConfigError(f"--target-modules {spec}: {model_type} has no linear layer '{part}'; its layers: "
                              f"{', '.join(sorted(have))} (or all-linear, attention, mlp)")
        else:
            names.append(part)
    return list(dict.fromkeys(names))


def linear_names(model: Any) -> set[str]:
    """Last name component of every linear layer below the output head (plain or bitsandbytes 4-bit)."""
    import torch

    out = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and leaf != "lm_head":  # bnb's Linear4bit subclasses Linear
            out.add(leaf)
    return out
