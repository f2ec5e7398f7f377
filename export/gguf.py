"""Export a merged Hugging Face model to GGUF for llama.cpp, and verify it against PyTorch.

Stages, one function each:

- ``plan_export``: read config, tokenizer and safetensors headers and decide everything; every
  problem is reported at once, before any work;
- ``write_gguf``: metadata, vocabulary and tensors (f32/f16/bf16) into one GGUF file;
- ``quantize_gguf``: llama.cpp's own quantizer for q8_0 and the k-quants, from a lossless
  intermediate, keeping the tensors ``gguf_tables.QUANT_TYPES`` names (measured there) at
  higher precision;
- ``verify_gguf``: tokenisation, teacher-forced logits and a greedy chat continuation through
  llama.cpp, compared with the HF tokenizer and the merged PyTorch model;
- ``write_modelfile``: an Ollama Modelfile beside the GGUF.

The verdict is written next to the file as ``FILE.gguf.verify.json`` (``edgeft.records``); a
failed check still writes it, marked failed. The GGUF is written, verified and recorded under a
temporary name, then renamed into place: a file under the final name always has its record.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_file, ensure_free_space
from edgeft.progress import say, step_progress
from edgeft.records import Check, Record, write_record
from export import gguf_tables as T

MODELFILE_SUFFIX = ".Modelfile"  # FILE.gguf -> FILE.Modelfile: several exports can share a directory
_SAFETENSORS_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
_BYTES = {"f32": 4, "f16": 2, "bf16": 2}


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


@dataclass
class TensorPlan:
    """One tensor to write: where it comes from and what happens to it on the way."""

    hf_name: str
    gguf_name: str
    file: Path
    shape: tuple[int, ...]  # HF order, (out_features, in_features) for linear weights
    dtype: str  # source dtype: f32 | f16 | bf16
    permute_heads: int | None = None  # llama q/k: heads to reorder from HF to GGUF RoPE layout


@dataclass
class VocabPlan:
    """The tokenizer as llama.cpp will see it."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE, byte fallback)
    pre: str | None  # tokenizer.ggml.pre (byte-level BPE only)
    pre_reason: str
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    scores: list[float] | None  # SentencePiece merge priority (higher merges first)
    add_space_prefix: bool | None
    add_bos: bool
    add_eos: bool
    special: Any  # gguf.SpecialVocab: merges, special ids, chat template
    hf_tokenizer: Any  # the reference the verification compares llama.cpp's tokenizer with


@dataclass
class ExportPlan:
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
    rope_freqs: np.ndarray | None = None  # llama3 RoPE scaling factors, one per rotary pair


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
    rope_freqs = _rope_freqs(model_dir, config, problems)
    n_rows = next((t.shape[0] for t in tensors if t.gguf_name == "token_embd.weight"), 0)
    vocab = _plan_vocab(model_dir, tok_json, n_rows, problems)
    if problems:
        raise EdgeftError("; ".join(problems))

    dtypes = {t.dtype for t in tensors if len(t.shape) > 1}
    source_dtype = dtypes.pop() if len(dtypes) == 1 else "f32"
    n_params = sum(int(np.prod(t.shape)) for t in tensors)
    return ExportPlan(model_dir, output, qtype, spec, hf_arch, arch, config, tensors, vocab,
                      source_dtype, n_params, rope_freqs)


def _read_config(model_dir: Path, problems: list[str]) -> dict[str, Any]:
    from edgeft.models import read_model_config

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
    return config


def _check_architecture(model_dir: Path, config: dict[str, Any], problems: list[str]) -> tuple[str, T.ArchSpec | None]:
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
    rope = config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "?"
    if rope_type not in T.SUPPORTED_ROPE_TYPES:
        problems.append(
            f"{model_dir / 'config.json'}: rope_scaling type {rope_type!r} has no GGUF equivalent here "
            f"(supported: {', '.join(T.SUPPORTED_ROPE_TYPES)})"
        )
    return name, spec


def _read_tokenizer_json(model_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    from edgeft.models import tokenizer_model_type

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
    if kind != "BPE":
        problems.append(f"{path}: {kind} tokenizers are not supported for GGUF export (supported: BPE, "
                        "byte-level or SentencePiece-style with byte fallback)")
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


def _read_headers(files: list[Path], problems: list[str]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (file, shape, dtype) for every tensor; a truncated or corrupt file is a problem."""
    from safetensors import safe_open

    out: dict[str, tuple[Path, tuple[int, ...], str]] = {}
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
            problems.append(f"{f}: unreadable safetensors file ({_one_line(e)}); re-export or re-download it")
    return out


def _map_tensors(config: dict[str, Any], arch: T.ArchSpec, headers: dict[str, tuple[Path, tuple[int, ...], str]],
                 problems: list[str]) -> list[TensorPlan]:
    """HF tensor names -> GGUF names (gguf-py's TensorNameMap), with the llama q/k permutation."""
    import gguf

    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
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
        heads = None
        if arch.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_Q:
            heads = n_head
        elif arch.permute_qk and kind == gguf.MODEL_TENSOR.ATTN_K:
            heads = n_head_kv
        plans.append(TensorPlan(hf_name, gguf_name, file, shape, dtype, heads))
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        problems.append(f"tensors with no llama.cpp equivalent: {', '.join(sorted(unknown)[:5])}{more}")
    names = {p.gguf_name for p in plans}
    if "token_embd.weight" not in names:
        problems.append("no token embedding tensor (model.embed_tokens.weight) in the safetensors files")
    if not tied and "output.weight" not in names:
        problems.append("tie_word_embeddings is false but there is no lm_head.weight in the safetensors files")
    expected_blocks = {f"blk.{i}.attn_q.weight" for i in range(n_layers)}
    if not expected_blocks <= names:
        problems.append(f"safetensors files miss layers: config says {n_layers} (num_hidden_layers)")
    return plans


def _rope_freqs(model_dir: Path, config: dict[str, Any], problems: list[str]) -> np.ndarray | None:
    """Per-pair frequency divisors for llama3 RoPE scaling (llama.cpp's ``rope_freqs`` tensor).

    transformers computes both inverse-frequency vectors; llama.cpp divides each default
    frequency by its factor, so the factor is their ratio.
    """
    rope = config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    try:
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
        base, _ = ROPE_INIT_FUNCTIONS["default"](cfg, "cpu")
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    except Exception as e:
        problems.append(f"{model_dir / 'config.json'}: cannot compute llama3 RoPE factors ({_one_line(e)})")
        return None
    return (base / scaled).float().numpy()


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _plan_vocab(model_dir: Path, tj: dict[str, Any], n_rows: int, problems: list[str]) -> VocabPlan | None:
    """Tokens, types, scores and flags for llama.cpp, from tokenizer.json and the HF tokenizer.

    The algorithm comes from tokenizer.json (``model.type``, ``byte_fallback``, pre-tokenizer),
    never from the tokenizer class name.
    """
    import gguf

    from edgeft.models import load_tokenizer

    model = tj.get("model") or {}
    vocab: dict[str, int] = model.get("vocab") or {}
    added = tj.get("added_tokens") or []
    id_to_text: dict[int, str] = {i: t for t, i in vocab.items()}
    id_to_text.update({int(a["id"]): a["content"] for a in added})
    n_tok = max(id_to_text, default=-1) + 1
    if n_tok > n_rows:
        problems.append(f"{model_dir}: tokenizer has {n_tok} tokens but the embedding has only {n_rows} rows")
        return None
    # Byte-level BPE (GPT-2 family) whenever a ByteLevel step is present: transformers marks
    # byte-level tokenizers it rebuilt from a GGUF with byte_fallback too. Otherwise a BPE with
    # byte fallback and "▁" word marks is SentencePiece-style (Llama 2, TinyLlama, Mistral).
    if _has_byte_level(tj):
        kind = "gpt2"
    elif model.get("byte_fallback"):
        kind = "llama"
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
        if missing:  # llama.cpp aborts on unknown characters without them
            problems.append(f"{model_dir / 'tokenizer.json'}: byte-fallback tokenizer lacks {len(missing)} of the "
                            f"256 byte tokens (e.g. {missing[0]}); llama.cpp needs all of them")
            return None
    else:
        problems.append(f"{model_dir / 'tokenizer.json'}: BPE tokenizer without ByteLevel or byte fallback "
                        "has no llama.cpp equivalent")
        return None

    # Rows past the tokenizer (embeddings padded to a round size) become unused placeholders.
    tokens = [id_to_text.get(i, f"[PAD{i}]") for i in range(n_rows)]
    types = [int(gguf.TokenType.NORMAL if i in id_to_text else gguf.TokenType.UNUSED) for i in range(n_rows)]
    for a in added:
        types[int(a["id"])] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)

    try:
        hf = load_tokenizer(str(model_dir))
    except EdgeftError as e:
        problems.append(e.format_message())
        return None
    add_bos, add_eos = _hf_adds_bos_eos(hf)

    scores = None
    add_space_prefix = None
    pre, pre_reason = None, "SentencePiece-style BPE (no pre-tokenizer)"
    if kind == "llama":
        if model.get("unk_token") in vocab:
            types[vocab[model["unk_token"]]] = int(gguf.TokenType.UNKNOWN)
        for i, t in enumerate(tokens):
            if _BYTE_TOKEN.fullmatch(t):
                types[i] = int(gguf.TokenType.BYTE)
        scores = _merge_scores(tokens, model.get("merges") or [])
        add_space_prefix = _adds_space_prefix(tj)
    else:
        multi_digit = any(re.fullmatch(r"\D?\d{2,}", t) for t in vocab)
        pre, pre_reason = T.pick_bpe_pre(
            split_regexes=_split_regexes(tj.get("pre_tokenizer")),
            byte_level_regex=_byte_level_uses_regex(tj.get("pre_tokenizer")),
            individual_digits=_has_individual_digits(tj.get("pre_tokenizer")),
            multi_digit_tokens=multi_digit,
            clean_up_spaces=bool(getattr(hf, "clean_up_tokenization_spaces", False)),
        )

    special = gguf.SpecialVocab(model_dir, load_merges=(kind == "gpt2"), n_vocab=n_rows)
    for typ, tid in (("bos", hf.bos_token_id), ("eos", hf.eos_token_id), ("unk", hf.unk_token_id),
                     ("pad", hf.pad_token_id)):
        if typ not in special.special_token_ids and tid is not None:
            special.special_token_ids[typ] = int(tid)
    # What the HF tokenizer actually does wins over whatever flags the files declare.
    special.add_special_token["bos"] = add_bos
    special.add_special_token["eos"] = add_eos
    if special.chat_template is None and getattr(hf, "chat_template", None):
        special.chat_template = hf.chat_template
    return VocabPlan(kind, pre, pre_reason, tokens, types, scores, add_space_prefix, add_bos, add_eos, special, hf)


def _hf_adds_bos_eos(hf: Any) -> tuple[bool, bool]:
    """Whether the HF tokenizer adds BOS/EOS when asked for special tokens (measured, not read)."""
    with_sp = hf("a", add_special_tokens=True)["input_ids"]
    without = hf("a", add_special_tokens=False)["input_ids"]
    add_bos = hf.bos_token_id is not None and len(with_sp) > len(without) and with_sp[0] == hf.bos_token_id
    add_eos = (hf.eos_token_id is not None and len(with_sp) > len(without) and with_sp[-1] == hf.eos_token_id
               and (not without or without[-1] != hf.eos_token_id))
    return bool(add_bos), bool(add_eos)


def _merge_scores(tokens: list[str], merges: list[Any]) -> list[float]:
    """SentencePiece-style scores from BPE merge ranks: llama.cpp merges the highest score first.

    A token made by merge ``r`` scores ``-r``; tokens no merge makes (characters, bytes,
    specials) score far below every merge so they are never preferred.
    """
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    return [float(-rank[t]) if t in rank else -1e9 for t in tokens]


def _adds_space_prefix(tj: dict[str, Any]) -> bool:
    """SentencePiece's "▁" prefix: a ``Prepend`` normalizer or a prepending ``Metaspace``."""
    for node in _walk(tj.get("normalizer")):
        if node.get("type") == "Prepend":
            return True
    for node in _walk(tj.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never") != "never"
    return False


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """A tokenizer.json component and, for ``Sequence`` components, its members."""
    if isinstance(node, dict):
        yield node
        for key in ("normalizers", "pretokenizers", "processors", "decoders"):
            for child in node.get(key) or []:
                yield from _walk(child)


def _has_byte_level(tj: dict[str, Any]) -> bool:
    return any(n.get("type") == "ByteLevel" for part in ("pre_tokenizer", "decoder") for n in _walk(tj.get(part)))


def _split_regexes(pre: Any) -> list[str]:
    return [n["pattern"]["Regex"] for n in _walk(pre)
            if n.get("type") == "Split" and isinstance(n.get("pattern"), dict) and "Regex" in n["pattern"]]


def _byte_level_uses_regex(pre: Any) -> bool:
    return any(n.get("type") == "ByteLevel" and n.get("use_regex", True) for n in _walk(pre))


def _has_individual_digits(pre: Any) -> bool:
    return any(n.get("type") == "Digits" and n.get("individual_digits") for n in _walk(pre))


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def write_gguf(plan: ExportPlan, path: Path, precision: str) -> None:
    """Write the whole model to ``path`` with 2-D tensors in ``precision`` (f32, f16 or bf16).

    Tensors stream from safetensors one at a time: peak memory is one tensor, not the model.
    """
    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[precision]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[plan.arch.gguf_arch])
    try:
        _write_all(writer, plan, precision, file_type)
    finally:
        writer.close()


def _write_all(writer: Any, plan: ExportPlan, precision: str, file_type: Any) -> None:
    """The writer's fixed order: metadata, tensor table, then tensor data, streamed."""
    import gguf
    import torch
    from safetensors import safe_open

    _add_model_metadata(writer, plan, file_type)
    _add_vocab_metadata(writer, plan.vocab)

    ggml_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                 "bf16": gguf.GGMLQuantizationType.BF16}
    out_types: list[str] = []
    for t in plan.tensors:
        # 1-D tensors (norms, biases) stay f32, as llama.cpp's converter keeps them.
        kind = precision if len(t.shape) > 1 else "f32"
        out_types.append(kind)
        nbytes = int(np.prod(t.shape)) * _BYTES[kind]
        np_dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[kind]
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np_dtype), nbytes, raw_dtype=ggml_type[kind])
    if plan.rope_freqs is not None:
        writer.add_tensor_info("rope_freqs.weight", plan.rope_freqs.shape, np.dtype(np.float32),
                               plan.rope_freqs.nbytes, raw_dtype=ggml_type["f32"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with contextlib.ExitStack() as stack, step_progress("writing GGUF tensors") as bar:
        handles: dict[Path, Any] = {}
        task = bar.add_task("writing GGUF tensors", total=len(plan.tensors))
        for t, kind in zip(plan.tensors, out_types):
            if t.file not in handles:
                handles[t.file] = stack.enter_context(safe_open(str(t.file), framework="pt"))
            try:
                x = handles[t.file].get_tensor(t.hf_name)
            except Exception as e:
                raise EdgeftError(f"{t.file}: cannot read tensor {t.hf_name} ({_one_line(e)})") from None
            if not bool(torch.isfinite(x).all()):
                raise EdgeftError(f"{t.file}: tensor {t.hf_name} holds NaN or inf values; the model is corrupt")
            if t.permute_heads:
                x = _permute_for_gguf_rope(x, t.permute_heads)
            writer.write_tensor_data(_to_numpy(x, kind))
            bar.advance(task)
        if plan.rope_freqs is not None:
            writer.write_tensor_data(plan.rope_freqs.astype(np.float32))


def _permute_for_gguf_rope(w: Any, n_head: int) -> Any:
    """Reorder q/k rows from HF's rotate-half RoPE layout to llama.cpp's interleaved one.

    Per head, HF keeps the first and second halves of each rotary pair in two blocks
    ``[x0 .. x(d/2-1) | y0 .. y(d/2-1)]``; llama.cpp expects them interleaved ``[x0 y0 x1 y1 ..]``.
    Works for weights (rows, cols) and biases (rows,).
    """
    rows = w.shape[0]
    head_dim = rows // n_head
    rest = tuple(w.shape[1:])
    # (n_head, 2, head_dim/2, *rest) -> (n_head, head_dim/2, 2, *rest): interleave the halves
    return w.reshape(n_head, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def _to_numpy(x: Any, kind: str) -> np.ndarray:
    import torch

    if kind == "f32":
        return x.to(torch.float32).contiguous().numpy()
    if kind == "f16":
        return x.to(torch.float16).contiguous().numpy()
    # bf16: numpy has no bfloat16; the raw 16-bit patterns go out as uint16
    return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def _add_model_metadata(w: Any, plan: ExportPlan, file_type: Any) -> None:
    import gguf

    c = plan.config
    n_embd = int(c["hidden_size"])
    n_head = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or n_embd // n_head)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(str(c.get("_name_or_path") or plan.model_dir.name).rsplit("/", 1)[-1] or plan.model_dir.name)
    w.add_context_length(int(c.get("max_position_embeddings") or 2048))
    w.add_embedding_length(n_embd)
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(c.get("num_key_value_heads") or n_head))
    w.add_rope_dimension_count(head_dim)
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(float(c.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(len(plan.vocab.tokens))
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope = c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                            or c.get("max_position_embeddings")))


def _add_vocab_metadata(w: Any, v: VocabPlan) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    v.special.add_to_gguf(w, quiet=True)


# --------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------


def quantize_gguf(src: Path, dst: Path, spec: T.QuantSpec) -> None:
    """Quantize ``src`` into ``dst`` with llama.cpp's quantizer: its mix, our higher-precision tensors."""
    llama_cpp = _import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(spec.file_type)
    params.nthread = _threads()
    if spec.embed_type is not None:
        # With tied embeddings llama.cpp quantizes token_embd as the output tensor, so both knobs.
        params.token_embedding_type = int(spec.embed_type)
        params.output_tensor_type = int(spec.embed_type)
    patterns = [p.encode() for p, _ in spec.keep]  # referenced until the call returns
    if spec.keep:
        overrides = (llama_cpp.llama_model_tensor_override * (len(spec.keep) + 1))()  # NULL-terminated
        for i, (pattern, (_, ggml_type)) in enumerate(zip(patterns, spec.keep)):
            overrides[i].pattern = pattern
            overrides[i].type = int(ggml_type)
        params.tt_overrides = overrides
    with _captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        last = next((ln for ln in reversed(log.read_text(errors="replace").splitlines()) if ln.strip()), "")
        raise EdgeftError(f"llama.cpp could not quantize {src.name} to {spec.file_type.name} "
                          f"(return code {rc}{': ' + last.strip() if last else ''})")


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Path]:
    """Send C-level stderr (llama.cpp's per-tensor log) to a temporary file, kept for error messages."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgeft-gguf-") as tmp:
        log = Path(tmp) / "stderr.txt"
        with open(log, "w") as fh:
            saved = os.dup(2)
            os.dup2(fh.fileno(), 2)
            try:
                yield log
            finally:
                os.dup2(saved, 2)
                os.close(saved)


def _import_llama_cpp() -> Any:
    from runtime.backends import import_llama_cpp  # one place sets up llama.cpp's logging and abort handling

    return import_llama_cpp()


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def verify_gguf(path: Path, model_dir: Path, spec: T.QuantSpec,
                hf_tok: Any = None) -> tuple[list[Check], dict[str, Any]]:
    """Compare the GGUF (through llama.cpp) with the HF tokenizer and the merged PyTorch model."""
    from edgeft.models import load_tokenizer

    llama_cpp = _import_llama_cpp()
    hf_tok = hf_tok if hf_tok is not None else load_tokenizer(str(model_dir))
    ref_model = _load_reference(model_dir)
    prompt_ids = _chat_prompt_ids(hf_tok)
    logit_ids = [hf_tok(t)["input_ids"] for t in T.LOGIT_SAMPLES] + [_chat_turn_ids(hf_tok)]
    n_ctx = max(256, max(len(x) for x in logit_ids), len(prompt_ids) + T.GREEDY_NEW_TOKENS)
    n_ctx = (n_ctx + 63) // 64 * 64

    try:
        with _captured_stderr():
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                  logits_all=True, verbose=False, n_threads=_threads(), seed=0)
    except Exception as e:  # llama-cpp-python raises ValueError for a file llama.cpp refuses
        return [Check("llama_cpp_loads", False, True, "==")], {"error": f"llama.cpp cannot load it: {_one_line(e)}"}

    checks = [Check("llama_cpp_loads", True, True, "==")]
    metrics: dict[str, Any] = {}
    try:
        tok = metrics["tokenization"] = _compare_tokenization(llm, hf_tok)
        checks.append(Check("tokenizer_mismatches", tok["mismatches"], 0, "<="))
        logits = metrics["logits"] = _compare_teacher_forced(llm, ref_model, logit_ids)
        checks.append(Check("top1_agreement", round(logits["top1_agreement"], 4), spec.min_top1, ">="))
        checks.append(Check("mean_kl", round(logits["mean_kl"], 5), spec.max_mean_kl, "<="))
        greedy = metrics["greedy"] = _compare_greedy(llm, ref_model, hf_tok, prompt_ids)
        checks.append(Check("greedy_match_tokens", greedy["matching_prefix"]))  # reported, no bar
    except Exception as e:  # a llama.cpp decode error is a verdict on the file, not a crash
        checks.append(Check("verification_completed", False, True, "=="))
        metrics["error"] = _one_line(e)
    finally:
        llm.close()
    return checks, metrics


def _threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _load_reference(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise EdgeftError(f"{model_dir}: cannot load the PyTorch reference model ({_one_line(e)})") from None
    return model.eval()


def _chat_prompt_ids(hf_tok: Any) -> list[int]:
    messages = [{"role": "user", "content": T.CHAT_PROBE}]
    if getattr(hf_tok, "chat_template", None):
        return list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    return hf_tok(T.CHAT_PROBE)["input_ids"]


def _chat_turn_ids(hf_tok: Any) -> list[int]:
    """A whole chat exchange, so chat-format positions are part of the logit comparison."""
    messages = [{"role": "user", "content": "Give me two tips for a good night's sleep."},
                {"role": "assistant", "content": "Keep a regular schedule, and avoid screens for an hour before bed."}]
    if getattr(hf_tok, "chat_template", None):
        return list(hf_tok.apply_chat_template(messages, tokenize=True))
    return hf_tok(" ".join(m["content"] for m in messages))["input_ids"]


def _compare_tokenization(llm: Any, hf_tok: Any) -> dict[str, Any]:
    """llama.cpp vs HF token ids, with special tokens parsed and BOS/EOS added as each would."""
    samples = list(T.TOKENIZER_SAMPLES)
    if getattr(hf_tok, "chat_template", None):
        samples.append(hf_tok.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! ¿Qué tal? 🙂"}],
            add_generation_prompt=True, tokenize=False))
    mismatches: list[dict[str, Any]] = []
    for text in samples:
        ref = list(hf_tok(text, add_special_tokens=True)["input_ids"])
        got = list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
        if ref != got:
            mismatches.append({"text": text[:80], "hf": ref[:24], "llama_cpp": got[:24]})
    return {"samples": len(samples), "mismatches": len(mismatches), "examples": mismatches[:3]}


def _compare_teacher_forced(llm: Any, ref_model: Any, sequences: list[list[int]]) -> dict[str, Any]:
    import torch

    from runtime.metrics import compare_logits

    refs, gots = [], []
    for ids in sequences:
        with torch.no_grad():
            refs.append(ref_model(torch.tensor([ids])).logits[0].float().numpy())
        llm.reset()
        llm.eval(ids)
        gots.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return compare_logits(np.concatenate(refs), np.concatenate(gots))


def _compare_greedy(llm: Any, ref_model: Any, hf_tok: Any, prompt: list[int]) -> dict[str, Any]:
    """Greedy continuation of a chat prompt by both models; the length of their common prefix."""
    import torch

    stop = {hf_tok.eos_token_id} | set(_as_list(getattr(ref_model.generation_config, "eos_token_id", None)))
    stop.discard(None)
    with torch.no_grad():
        out = ref_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=T.GREEDY_NEW_TOKENS, do_sample=False, eos_token_id=sorted(stop) or None,
                                 pad_token_id=hf_tok.pad_token_id)
    ref = out[0, len(prompt):].tolist()

    got: list[int] = []
    llm.reset()
    llm.eval(prompt)
    for _ in range(T.GREEDY_NEW_TOKENS):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(nxt)
        if nxt in stop:
            break
        llm.eval([nxt])
    match = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    return {"reference_tokens": len(ref), "matching_prefix": match,
            "reference_text": hf_tok.decode(ref), "gguf_text": hf_tok.decode(got)}


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


# --------------------------------------------------------------------------------------------
# Modelfile
# --------------------------------------------------------------------------------------------


def modelfile_text(gguf_name: str, vocab: VocabPlan) -> str:
    """An Ollama Modelfile for ``gguf_name`` (in the same directory)."""
    template = vocab.special.chat_template
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    fmt = T.find_chat_format(template)
    eos_id = vocab.special.special_token_ids.get("eos")
    stops = list(fmt.stops) if fmt else []
    if eos_id is not None and vocab.tokens[eos_id] not in stops:
        stops.insert(0, vocab.tokens[eos_id])

    lines = [f"# Ollama Modelfile for {gguf_name}, written by edgeft.", f"# Use: ollama create NAME -f {gguf_name.rsplit('.', 1)[0]}.Modelfile",
             f"FROM ./{gguf_name}"]
    if fmt is not None:
        lines.append(f'TEMPLATE """{fmt.ollama_template}"""')
        system = _default_system_prompt(template or "", fmt)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# No TEMPLATE: Ollama derives one from the GGUF's tokenizer.chat_template.")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"


def _default_system_prompt(template: str, fmt: T.ChatFormat) -> str | None:
    """The system message a ChatML template inserts when the conversation has none."""
    if fmt.name != "chatml":
        return None
    m = re.search(r"<\|im_start\|>system\s*\n(.+?)<\|im_end\|>", template, re.S)
    if not m or any(s in m.group(1) for s in ("{{", "{%", "'", '"')):
        return None
    return m.group(1).strip()


def write_modelfile(gguf_path: Path, vocab: VocabPlan) -> Path:
    path = gguf_path.with_name(gguf_path.stem + MODELFILE_SUFFIX)
    with atomic_file(path) as tmp:
        tmp.write_text(modelfile_text(gguf_path.name, vocab), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def export_gguf(model_dir: Path, output: Path, *, qtype: str = "f16", overwrite: bool = False) -> Record:
    """Export a merged HF model directory to a GGUF file, verify it, and write its record.

    Returns the record (also written to ``OUTPUT.verify.json``); a failed verification is a
    record with status "failed", not an exception. User errors (unsupported architecture,
    missing tokenizer, unreadable weights, existing output) raise ``EdgeftError`` before any
    file is written.
    """
    t_start = time.perf_counter()
    plan = plan_export(Path(model_dir), Path(output), qtype, overwrite)
    out = plan.output
    ensure_free_space(out, _space_needed(plan), "the GGUF export")

    timings: dict[str, float] = {}
    # The file is verified and recorded under its temporary name, then renamed: whatever sits
    # under the final name has its record beside it, bound to its bytes.
    with atomic_file(out) as tmp:
        t0 = time.perf_counter()
        if plan.spec.direct:
            write_gguf(plan, tmp, plan.qtype)
            timings["write_s"] = time.perf_counter() - t0
        else:
            _write_quantized(plan, tmp, timings)

        t0 = time.perf_counter()
        say(f"verifying {out.name} against the PyTorch model")
        checks, verify_metrics = verify_gguf(tmp, plan.model_dir, plan.spec, plan.vocab.hf_tokenizer)
        timings["verify_s"] = time.perf_counter() - t0
        modelfile = write_modelfile(out, plan.vocab)
        timings["total_s"] = time.perf_counter() - t_start
        size = tmp.stat().st_size
        record = Record(
            artifact=str(out), kind="gguf", reference=str(plan.model_dir), checks=checks,
            metrics={
                "type": plan.qtype,
                "file_size_bytes": size,
                "file_size_mib": round(size / 2**20, 2),
                **_describe(plan, tmp),
                "modelfile": str(modelfile),
                **verify_metrics,
                "timings_s": {k: round(v, 2) for k, v in timings.items()},
            },
        )
        write_record(out, record, data=tmp)
    return record


def _write_quantized(plan: ExportPlan, dst: Path, timings: dict[str, float]) -> None:
    """Lossless intermediate in the source precision, then llama.cpp's quantizer into ``dst``."""
    # A ".NAME.PID*.partial" name: the next export to this name removes it if this process dies first.
    inter = plan.output.with_name(f".{plan.output.name}.{os.getpid()}.intermediate.partial")
    try:
        t0 = time.perf_counter()
        write_gguf(plan, inter, plan.source_dtype)
        timings["write_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        say(f"quantizing to {plan.qtype} with llama.cpp")
        quantize_gguf(inter, dst, plan.spec)
        timings["quantize_s"] = time.perf_counter() - t0
    finally:
        inter.unlink(missing_ok=True)


def _space_needed(plan: ExportPlan) -> int:
    """Bytes the export needs at its peak (intermediate + quantized file), with some slack."""
    if plan.spec.direct:
        need = sum(int(np.prod(t.shape)) * (_BYTES[plan.qtype] if len(t.shape) > 1 else 4) for t in plan.tensors)
    else:
        need = (sum(int(np.prod(t.shape)) * _BYTES[plan.source_dtype] for t in plan.tensors)
                + int(plan.n_params * plan.spec.bits_per_weight / 8))
    return int(need * 1.05) + (32 << 20)


def _describe(plan: ExportPlan, path: Path) -> dict[str, Any]:
    """What was written: architecture, tokenizer choices, and the type of every tensor."""
    import gguf

    from collections import Counter

    types = gguf_tensor_types(path)
    v = plan.vocab
    return {
        "architecture": {"hf": plan.hf_arch, "gguf": gguf.MODEL_ARCH_NAMES[plan.arch.gguf_arch],
                         "tied_embeddings": "output.weight" not in types},
        "n_params": plan.n_params,
        "tensor_types": dict(Counter(types.values())),
        "embedding_type": types.get("token_embd.weight"),
        "output_type": types.get("output.weight", "tied to token_embd"),
        "intermediate": None if plan.spec.direct else plan.source_dtype,
        "tokenizer": {"model": v.model, "pre": v.pre, "pre_reason": v.pre_reason, "tokens": len(v.tokens),
                      "add_bos": v.add_bos, "add_eos": v.add_eos,
                      "special_ids": dict(v.special.special_token_ids),
                      "chat_template": v.special.chat_template is not None},
        "versions": _versions(),
    }


def gguf_tensor_types(path: Path) -> dict[str, str]:
    """Tensor name -> GGML type name, read from the GGUF header alone (``runtime.weights``)."""
    from runtime.weights import read_gguf_header

    return {t.name: t.ggml_type for t in read_gguf_header(path).tensors}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("llama-cpp-python", "gguf", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
