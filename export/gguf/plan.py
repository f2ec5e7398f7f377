"""Plan a GGUF export: read the model directory (config, tokenizer, safetensors headers), map each
tensor to its GGUF name, and check it all before any file is written.

``plan_export`` reports every problem at once in one ``EdgeftError``. The architecture row
(``tables.ARCHITECTURES``) decides the llama.cpp graph and any tensor transform; the GGUF type of
each tensor is chosen in ``tensor_types.py``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.core.errors import EdgeftError, one_line
from export.gguf import arch_hooks as H
from export.gguf import tables as T
from export.gguf.tensor_types import intermediate_precision
from export.gguf.vocab import VocabPlan, plan_vocab

_SAFETENSORS_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}

# name -> (file, shape, dtype) of every tensor in the safetensors files
Headers = dict[str, tuple[Path, tuple[int, ...], str]]


@dataclass
class TensorPlan:
    """One tensor to write: where it comes from and what it becomes."""

    hf_name: str
    gguf_name: str
    kind: Any  # gguf.MODEL_TENSOR, what the architecture's transform goes by
    file: Path
    shape: tuple[int, ...]  # HF order, (out_features, in_features) for linear weights
    dtype: str  # source dtype: f32 | f16 | bf16


@dataclass
class ExportPlan:
    """Everything the export decided before writing: inputs, output, type, tensors, vocabulary."""

    model_dir: Path
    output: Path
    qtype: str
    spec: T.QuantSpec
    hf_arch: str
    arch: T.ArchSpec
    config: dict[str, Any]
    tensors: list[TensorPlan]
    vocab: VocabPlan
    source_dtype: str  # lossless dtype for an intermediate: f32 | f16 | bf16
    n_params: int
    # tensors llama.cpp needs that the checkpoint does not store (RoPE factor tables), written as f32
    extra_tensors: list[tuple[str, np.ndarray]] = field(default_factory=list)


def plan_export(model_dir: Path, output: Path, qtype: str, overwrite: bool) -> ExportPlan:
    """Read everything the export needs and check it; raise one EdgeftError listing all problems."""
    model_dir, output = Path(model_dir), Path(output)
    logging.getLogger("gguf").setLevel(logging.ERROR)  # gguf-py logs every key it writes
    problems: list[str] = []
    spec = T.QUANT_TYPES.get(qtype)
    if spec is None:
        problems.append(f"--type {qtype}: unknown GGUF type (choose from {', '.join(T.QUANT_TYPES)})")
    if output.is_dir():
        problems.append(f"--output {output} is a directory; give the .gguf file to write")
    elif output.exists() and not overwrite:
        problems.append(f"--output {output} already exists; pass --overwrite to replace it")
    if not model_dir.is_dir():
        raise EdgeftError("; ".join(problems + [f"--model {model_dir}: not a directory"]))

    config = _read_config(model_dir, problems)
    hf_arch, arch = _check_architecture(model_dir, config, problems)
    tok_json = _read_tokenizer_json(model_dir, problems)
    files = _safetensors_files(model_dir, problems)
    headers = _read_headers(files, problems)
    if problems:
        raise EdgeftError("; ".join(problems))
    assert arch is not None and tok_json is not None and spec is not None

    tensors = _map_tensors(config, arch, headers, problems)
    extra = _extra_tensors(model_dir, config, arch, problems)
    n_rows = next((t.shape[0] for t in tensors if t.gguf_name == "token_embd.weight"), 0)
    vocab = plan_vocab(model_dir, tok_json, n_rows, problems)
    if problems:
        raise EdgeftError("; ".join(problems))

    source_dtype = intermediate_precision({t.dtype for t in tensors if len(t.shape) > 1})
    n_params = sum(int(np.prod(t.shape)) for t in tensors)
    return ExportPlan(model_dir, output, qtype, spec, hf_arch, arch, config, tensors, vocab,
                      source_dtype, n_params, extra)


def _read_config(model_dir: Path, problems: list[str]) -> dict[str, Any]:
    from runtime.modelfiles import read_model_config

    if not (model_dir / "config.json").is_file():
        problems.append(f"{model_dir}: no config.json (not a Hugging Face model directory)")
        return {}
    try:
        config = read_model_config(str(model_dir))
    except EdgeftError as e:
        problems.append(e.format_message())
        return {}
    if not isinstance(config, dict):
        problems.append(f"{model_dir / 'config.json'}: not a JSON object")
        return {}
    return {**_class_defaults(model_dir), **config}


def _class_defaults(model_dir: Path) -> dict[str, Any]:
    """Every setting of the model's config class, defaults included: ``save_pretrained`` leaves out
    values equal to the base defaults (Gemma 3's ``tie_word_embeddings``, SmolLM3's
    ``no_rope_layers``), and the file alone would read them wrongly."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False).to_dict()
    except Exception:  # an unknown model type: the architecture check names it
        return {}


def _check_architecture(model_dir: Path, config: dict[str, Any], problems: list[str]) -> tuple[str, T.ArchSpec | None]:
    """The HF architecture name and its table row; None (with a problem) when it is not supported."""
    if not config:
        return "", None
    archs = config.get("architectures") or []
    name = archs[0] if archs else f"model_type={config.get('model_type', '?')}"
    spec = T.ARCHITECTURES.get(name)
    if spec is None:
        problems.append(
            f"{model_dir}: architecture {name} is not supported for GGUF export "
            f"(supported: {', '.join(T.ARCHITECTURES)})"
        )
        return name, None
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in keys if not isinstance(config.get(k), int)]
    if missing:
        problems.append(f"{model_dir / 'config.json'}: missing or non-integer {', '.join(missing)}")
    if missing:
        return name, spec
    rope_type = H.rope_type(config)
    if rope_type not in spec.rope_types:
        problems.append(
            f"{model_dir / 'config.json'}: rope_scaling type {rope_type!r} has no GGUF equivalent for {name} "
            f"(supported: {', '.join(spec.rope_types)})"
        )
    if spec.check is not None:
        problems += [f"{model_dir / 'config.json'}: {name}: {p}" for p in spec.check(config)]
    return name, spec


def _read_tokenizer_json(model_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    from runtime.modelfiles import tokenizer_model_type

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        problems.append(
            f"{model_dir}: no tokenizer.json; GGUF export needs the fast tokenizer "
            "(save it with AutoTokenizer.from_pretrained(...).save_pretrained(DIR))"
        )
        return None
    kind = tokenizer_model_type(model_dir)
    if kind is None:
        problems.append(f"{path}: unreadable tokenizer file (invalid JSON or no model.type)")
        return None
    if kind not in ("BPE", "Unigram"):
        problems.append(f"{path}: {kind} tokenizers are not supported for GGUF export (supported: BPE, "
                        "byte-level or SentencePiece-style with byte fallback; Unigram with byte fallback)")
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _safetensors_files(model_dir: Path, problems: list[str]) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{index}: unreadable shard index ({e})")
            return []
        files = [model_dir / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            problems.append(f"{index}: shards missing: {', '.join(missing)}")
            return []
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt"))
        problems.append(f"{model_dir}: no *.safetensors weights"
                        + (" (only pickle weights, which GGUF export does not load)" if pickles else ""))
    return files


def _read_headers(files: list[Path], problems: list[str]) -> Headers:
    """name -> (file, shape, dtype) for every tensor; a truncated or corrupt file is a problem."""
    from safetensors import safe_open

    out: Headers = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        problems.append(f"{f}: tensor {name} has dtype {sl.get_dtype()} (expected F32, F16 or BF16)")
                        continue
                    out[name] = (f, tuple(sl.get_shape()), dtype)
        except Exception as e:  # SafetensorError, OSError: a truncated, corrupt or unreadable file
            problems.append(f"{f}: unreadable safetensors file ({one_line(e)}); re-export or re-download it")
    return out


def _map_tensors(config: dict[str, Any], arch: T.ArchSpec, headers: Headers, problems: list[str]) -> list[TensorPlan]:
    """HF tensor names -> GGUF names (gguf-py's TensorNameMap); every tensor must map, none may be missing."""
    import gguf

    n_layers = int(config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, n_layers)
    allowed = set(gguf.MODEL_TENSORS[arch.gguf_arch]) - {gguf.MODEL_TENSOR.ROPE_FREQS, gguf.MODEL_TENSOR.ATTN_ROT_EMBD}

    plans: list[TensorPlan] = []
    unknown: list[str] = []
    for hf_name, (file, shape, dtype) in headers.items():
        if hf_name.endswith(T.SKIPPED_TENSOR_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        mapped = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None or mapped[0] not in allowed:
            unknown.append(hf_name)
            continue
        kind, gguf_name = mapped
        plans.append(TensorPlan(hf_name, gguf_name, kind, file, shape, dtype))
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        problems.append(f"tensors with no llama.cpp equivalent: {', '.join(sorted(unknown)[:5])}{more}")
    names = {p.gguf_name for p in plans}
    if "token_embd.weight" not in names:
        problems.append("no token embedding tensor (model.embed_tokens.weight) in the safetensors files")
    if not tied and "output.weight" not in names:
        problems.append("tie_word_embeddings is false but there is no lm_head.weight in the safetensors files")
    # every layer has its query projection, alone (attn_q) or fused with k and v (attn_qkv, Phi-3)
    if any(f"blk.{i}.attn_q.weight" not in names and f"blk.{i}.attn_qkv.weight" not in names
           for i in range(n_layers)):
        problems.append(f"safetensors files miss layers: config says {n_layers} (num_hidden_layers)")
    return plans


def _extra_tensors(model_dir: Path, config: dict[str, Any], arch: T.ArchSpec,
                   problems: list[str]) -> list[tuple[str, np.ndarray]]:
    """The architecture's computed tensors (llama3 ``rope_freqs``, Phi-3 longrope factor tables)."""
    if arch.extra_tensors is None:
        return []
    try:
        return arch.extra_tensors(model_dir, config)
    except Exception as e:
        problems.append(H.extra_tensor_problem(model_dir, e))
        return []
