"""Checks made before any weights are loaded: the variant asked for, the output path, what the source
model directory holds (config, safetensors, tokenizer), whether optimum can export it, and the disk
space the export needs."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft.core.errors import ConfigError, EdgeftError
from export.onnx.quantize import higher_precision
from export.onnx.stages import quiet
from export.onnx.write import TASK
from runtime.modelfiles import read_model_config

VARIANTS = ("fp32", "fp16", "int8", "int4")


def parse_variant(quantize: str | None) -> str:
    """The variant named by ``--quantize`` (None, "", "none" and "fp32" all mean fp32)."""
    variant = "fp32" if quantize in (None, "", "none", "fp32") else str(quantize).lower()
    if variant not in VARIANTS:
        raise ConfigError(f"--quantize {quantize}: unknown variant; choose one of none, int8, int4, fp16")
    return variant


def check_output(output: Path, overwrite: bool) -> None:
    """``output`` may be written: absent, or a directory that ``overwrite`` allows replacing."""
    if output.exists() and not output.is_dir():
        raise EdgeftError(f"--output {output} exists and is a file; ONNX exports are directories")
    if output.exists() and not overwrite:
        raise EdgeftError(f"--output {output} already exists; pass --overwrite to replace it")


@dataclass
class Source:
    """What the model directory holds, read without loading weights."""

    path: Path
    model_type: str
    weight_files: list[Path]
    n_params: int
    weight_bytes: int


def inspect_model_dir(model_dir: Path) -> Source:
    """Check a merged model directory (config, safetensors, tokenizer); every problem in one error."""
    flag = "--model"
    if not model_dir.is_dir():
        raise EdgeftError(f"{flag} {model_dir}: not a directory")
    problems: list[str] = []
    config: dict[str, Any] = {}
    if not (model_dir / "config.json").is_file():
        problems.append("no config.json")
    else:
        try:
            config = read_model_config(str(model_dir))
        except EdgeftError as e:
            problems.append(str(e.format_message()))
    weight_files = sorted(model_dir.glob("*.safetensors"))
    if not weight_files:
        pickles = [p.name for p in model_dir.glob("*.bin")]
        problems.append("no *.safetensors weights" + (f" (found pickle {pickles[0]}; re-save with safetensors)" if pickles else ""))
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        problems.append("no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    n_params = weight_bytes = 0
    for f in weight_files:
        try:
            n, b = safetensors_size(f)
        except EdgeftError as e:
            problems.append(e.format_message())
            continue
        n_params, weight_bytes = n_params + n, weight_bytes + b
    problems += _missing_shards(model_dir)
    if problems:
        raise EdgeftError(f"{flag} {model_dir}: " + "; ".join(problems))
    model_type = str(config.get("model_type", ""))
    _check_supported(model_dir, model_type)
    return Source(model_dir, model_type, weight_files, n_params, weight_bytes)


def check_eight_bit(model_dir: Path, eight_bit: tuple[str, ...] | list[str]) -> None:
    """Each ``--eight-bit`` pattern must name at least one linear layer of the decoder, by PyTorch module name
    (read from the safetensors headers, before any weights are loaded)."""
    if not eight_bit:
        return
    linears = sorted(name.removesuffix(".weight") for f in sorted(model_dir.glob("*.safetensors"))
                     for name, info in _header(f)[0].items()
                     if name.endswith(".weight") and ".layers." in name and len(info.get("shape", ())) == 2)
    for pattern in eight_bit:
        if not any(higher_precision(n, (pattern,)) for n in linears):
            example = linears[0] if linears else "model.layers.0.mlp.up_proj"
            raise ConfigError(f"--eight-bit {pattern!r}: matches no linear layer of the decoder "
                              f"(PyTorch module names, e.g. {example})")


def safetensors_size(path: Path) -> tuple[int, int]:
    """(parameter count, data bytes) from a safetensors header; truncated or corrupt files raise."""
    size = path.stat().st_size
    header, header_bytes = _header(path)
    params, end = 0, 0
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            params += math.prod(info["shape"])
            end = max(end, int(info["data_offsets"][1]))
    except (KeyError, TypeError, IndexError, ValueError):
        raise EdgeftError(f"{path.name} is corrupt (bad tensor entry in header)") from None
    if 8 + header_bytes + end > size:
        raise EdgeftError(f"{path.name} is truncated ({size} bytes; its header declares {8 + header_bytes + end}); copy or save it again")
    return params, end


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header of ``path`` (tensor name -> dtype, shape, offsets) and its length in bytes;
    truncated or corrupt files raise."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise EdgeftError(f"{path.name} is truncated ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise EdgeftError(f"{path.name} is corrupt or truncated (header length {n} > file size {size})")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise EdgeftError(f"{path.name} is corrupt (header is not JSON)") from None
    if not isinstance(header, dict):
        raise EdgeftError(f"{path.name} is corrupt (header is not a JSON object)")
    return header, n


def _missing_shards(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return [f"{index.name} is not a valid shard index"]
    return [f"shard {s} listed in {index.name} is missing" for s in sorted(shards) if not (model_dir / s).is_file()]


def _check_supported(model_dir: Path, model_type: str) -> None:
    with quiet():
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
        from optimum.exporters.tasks import TasksManager

        try:
            tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
        except (KeyError, ValueError):
            tasks = {}
    if TASK not in tasks:
        raise EdgeftError(f"--model {model_dir}: optimum cannot export model_type {model_type!r} to ONNX with a KV cache")


def space_needed(source: Source, variant: str) -> int:
    """Bytes of free disk the export of ``variant`` needs, generously estimated from the parameter count."""
    fp32 = source.n_params * 4
    share = {"fp32": 0.0, "fp16": 0.5, "int8": 0.35, "int4": 0.3}[variant]  # variant size / fp32 size, generous
    # fp32 graph + variant graph + intermediate files of the quantizers + tokenizer/config slack.
    return int(fp32 * (1 + 2 * share) + 64 * 2**20)
