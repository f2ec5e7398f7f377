"""Plan a GGUF LoRA export: read the PEFT adapter (config and safetensors header) and its base model's
config, map every lora_A/lora_B pair to its llama.cpp tensor name, and check it all at once."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError
from edgeft.core.records import read_record
from export.gguf import tables as T
from runtime.artifacts import adapter_config, base_model_of
from runtime.modelfiles import read_model_config

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraPair:
    """One adapted linear layer: the PEFT tensor names and the GGUF base tensor they modify."""

    hf_weight: str  # e.g. model.layers.0.self_attn.q_proj.weight
    gguf_name: str  # e.g. blk.0.attn_q.weight (the adapter tensors add .lora_a / .lora_b)
    kind: Any  # gguf.MODEL_TENSOR, what the architecture's transform goes by
    a_name: str
    b_name: str


@dataclass
class LoraPlan:
    adapter: Path
    base_gguf: Path
    output: Path
    base_model: str  # the HF directory the adapter was trained on
    config: dict[str, Any]  # the base model's config.json
    arch: T.ArchSpec
    alpha: float  # written so that llama.cpp's alpha / rank is PEFT's scaling
    rank: int
    pairs: list[LoraPair]
    base_type: str  # the base GGUF's --type (its record), which sets the verification bars


def plan_lora_export(adapter: Path, base_gguf: Path, output: Path, overwrite: bool) -> LoraPlan:
    """Everything the export needs, or one ``EdgeftError`` naming every problem."""
    problems: list[str] = []
    if output.exists() and not overwrite:
        problems.append(f"--output {output} already exists; pass --overwrite to replace it")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise EdgeftError(f"--adapter {adapter}: no {ADAPTER_WEIGHTS} (a PEFT LoRA adapter directory)")
    peft = adapter_config(adapter)
    base_type = _base_type(base_gguf, problems)
    base_model = base_model_of(adapter)
    config = read_model_config(base_model)
    archs = config.get("architectures") or ["?"]
    arch = T.ARCHITECTURES.get(archs[0])
    if arch is None:
        raise EdgeftError("; ".join(problems + [f"{base_model}: architecture {archs[0]} has no GGUF export"]))
    for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if peft.get(key):
            problems.append(f"{adapter}/adapter_config.json: {key} is set; llama.cpp adapters hold plain LoRA only")
    rank, alpha = int(peft["r"]), float(peft["lora_alpha"])
    # llama.cpp scales by alpha / rank; rsLoRA scales by alpha / sqrt(rank).
    alpha_written = alpha * math.sqrt(rank) if peft.get("use_rslora") else alpha
    pairs = _map_pairs(adapter / ADAPTER_WEIGHTS, config, arch, problems)
    if problems:
        raise EdgeftError("; ".join(problems))
    return LoraPlan(adapter, base_gguf, output, base_model, config, arch, alpha_written, rank, pairs, base_type)


def _base_type(base_gguf: Path, problems: list[str]) -> str:
    """The base GGUF's type from its verification record (the base must itself be verified)."""
    if not base_gguf.is_file():
        problems.append(f"--base {base_gguf}: not found")
        return "f16"
    try:
        record = read_record(base_gguf)
    except EdgeftError as e:
        problems.append(f"--base {e.format_message()}")
        return "f16"
    qtype = str(record.get("metrics", {}).get("type") or "f16")
    return qtype if qtype in T.QUANT_TYPES else "f16"


def _map_pairs(weights: Path, config: dict[str, Any], arch: T.ArchSpec, problems: list[str]) -> list[LoraPair]:
    """lora_A/lora_B names of the safetensors header -> the GGUF base tensor each pair adapts."""
    import gguf

    names = _header_names(weights)
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, int(config["num_hidden_layers"]))
    pairs, unknown = [], []
    for a_name in sorted(n for n in names if n.endswith(".lora_A.weight")):
        module = a_name[: -len(".lora_A.weight")]
        b_name = f"{module}.lora_B.weight"
        hf_weight = module.removeprefix(_PEFT_PREFIX) + ".weight"
        mapped = name_map.get_type_and_name(hf_weight, try_suffixes=(".weight",))
        if b_name not in names or mapped is None:
            unknown.append(hf_weight)
            continue
        pairs.append(LoraPair(hf_weight, mapped[1], mapped[0], a_name, b_name))
    other = [n for n in names if ".lora_A." not in n and ".lora_B." not in n]
    if unknown or other:
        problems.append(f"{weights}: tensors llama.cpp cannot apply as LoRA: {', '.join((unknown + other)[:5])}")
    if not pairs:
        problems.append(f"{weights}: no lora_A/lora_B pairs")
    return pairs


def _header_names(path: Path) -> set[str]:
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    return {k for k in header if k != "__metadata__"}
