"""The tokenizer as llama.cpp will see it: tokens, types, scores, pre-tokenizer and special
tokens planned from ``tokenizer.json`` and the Hugging Face tokenizer, then written as GGUF metadata.

The algorithm comes from tokenizer.json (``model.type``, ``byte_fallback``, pre-tokenizer),
never from the tokenizer class name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from edgeft.core.errors import EdgeftError
from export.gguf import tables as T

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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


def plan_vocab(model_dir: Path, tj: dict[str, Any], n_rows: int, problems: list[str]) -> VocabPlan | None:
    """Tokens, types, scores and flags for llama.cpp, from tokenizer.json and the HF tokenizer.

    ``n_rows`` is the embedding's row count: rows past the tokenizer become unused placeholders.
    Problems are appended to ``problems`` (and None returned) rather than raised.
    """
    from runtime.modelfiles import load_tokenizer

    added = tj.get("added_tokens") or []
    id_to_text = {i: t for t, i in model_vocab(tj).items()}
    id_to_text.update({int(a["id"]): a["content"] for a in added})
    n_tok = max(id_to_text, default=-1) + 1
    if n_tok > n_rows:
        problems.append(f"{model_dir}: tokenizer has {n_tok} tokens but the embedding has only {n_rows} rows")
        return None
    kind = _vocab_kind(model_dir, tj, problems)
    if kind is None:
        return None
    tokens, types = _token_table(id_to_text, added, n_rows)
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
        scores, add_space_prefix = _sentencepiece_fields(tj, tokens, types)
    else:
        pre, pre_reason = _pick_pre(tj, hf)
    special = _special_vocab(model_dir, kind, n_rows, hf, add_bos, add_eos)
    return VocabPlan(kind, pre, pre_reason, tokens, types, scores, add_space_prefix, add_bos, add_eos, special, hf)


def add_vocab_metadata(w: Any, v: VocabPlan) -> None:
    """The ``tokenizer.ggml.*`` keys of ``v`` into a GGUFWriter (before its header is written)."""
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


def model_vocab(tj: dict[str, Any]) -> dict[str, int]:
    """token -> id of tokenizer.json's model: a mapping for BPE, a list of [piece, score] for Unigram.

    transformers' Gemma GGUF converter renames the tab byte token ``<0x09>`` to a literal tab; it
    is the byte token again here (llama.cpp reaches it through byte fallback, with the same id).
    """
    raw = (tj.get("model") or {}).get("vocab") or {}
    vocab = {p[0]: i for i, p in enumerate(raw)} if isinstance(raw, list) else dict(raw)
    if "<0x09>" not in vocab and "\t" in vocab:
        vocab["<0x09>"] = vocab.pop("\t")
    return vocab


def _unigram_scores(tj: dict[str, Any], n_rows: int) -> list[float]:
    """A Unigram model's own log-probabilities, one per embedding row (placeholders far below)."""
    raw = (tj.get("model") or {}).get("vocab") or []
    return [float(raw[i][1]) if i < len(raw) else -1e9 for i in range(n_rows)]


def _vocab_kind(model_dir: Path, tj: dict[str, Any], problems: list[str]) -> str | None:
    """tokenizer.ggml.model ("gpt2" or "llama"), or None with a problem when llama.cpp has no equivalent."""
    model = tj.get("model") or {}
    vocab = model_vocab(tj)
    # Byte-level BPE (GPT-2 family) whenever a ByteLevel step is present: transformers marks
    # byte-level tokenizers it rebuilt from a GGUF with byte_fallback too. Otherwise a BPE with
    # byte fallback and "▁" word marks is SentencePiece-style (Llama 2, TinyLlama, Mistral, Phi-3),
    # and so is a Unigram with byte fallback (Gemma, as transformers builds it from a GGUF): both are
    # llama.cpp's "llama" vocabulary, which merges by score.
    if _has_byte_level(tj):
        return "gpt2"
    if model.get("byte_fallback"):
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
        if missing:  # llama.cpp aborts on unknown characters without them
            problems.append(f"{model_dir / 'tokenizer.json'}: byte-fallback tokenizer lacks {len(missing)} of the "
                            f"256 byte tokens (e.g. {missing[0]}); llama.cpp needs all of them")
            return None
        return "llama"
    problems.append(f"{model_dir / 'tokenizer.json'}: {model.get('type')} tokenizer without ByteLevel or byte "
                    "fallback has no llama.cpp equivalent")
    return None


def _token_table(id_to_text: dict[int, str], added: list[dict[str, Any]], n_rows: int) -> tuple[list[str], list[int]]:
    """One token and one gguf.TokenType per embedding row; rows past the tokenizer are unused placeholders."""
    import gguf

    # Embeddings padded to a round size have rows no token uses.
    tokens = [id_to_text.get(i, f"[PAD{i}]") for i in range(n_rows)]
    types = [int(gguf.TokenType.NORMAL if i in id_to_text else gguf.TokenType.UNUSED) for i in range(n_rows)]
    for a in added:
        types[int(a["id"])] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    return tokens, types


def _sentencepiece_fields(tj: dict[str, Any], tokens: list[str], types: list[int]) -> tuple[list[float], bool]:
    """SentencePiece-style BPE: marks the unknown and byte tokens in ``types``; returns scores and
    whether a "▁" is prefixed."""
    import gguf

    model = tj.get("model") or {}
    vocab = model_vocab(tj)
    unk = model.get("unk_token")
    unk_id = vocab.get(unk) if unk is not None else model.get("unk_id")
    if unk_id is not None:
        types[int(unk_id)] = int(gguf.TokenType.UNKNOWN)
    for i, t in enumerate(tokens):
        if _BYTE_TOKEN.fullmatch(t):
            types[i] = int(gguf.TokenType.BYTE)
    if model.get("type") == "Unigram":
        return _unigram_scores(tj, len(tokens)), _adds_space_prefix(tj)
    return _merge_scores(tokens, model.get("merges") or []), _adds_space_prefix(tj)


def _pick_pre(tj: dict[str, Any], hf: Any) -> tuple[str, str]:
    """Byte-level BPE: tokenizer.ggml.pre and why (``tables.pick_bpe_pre``)."""
    multi_digit = any(re.fullmatch(r"\D?\d{2,}", t) for t in model_vocab(tj))
    return T.pick_bpe_pre(
        split_regexes=_split_regexes(tj.get("pre_tokenizer")),
        byte_level_regex=_byte_level_uses_regex(tj.get("pre_tokenizer")),
        individual_digits=_has_individual_digits(tj.get("pre_tokenizer")),
        multi_digit_tokens=multi_digit,
        clean_up_spaces=bool(getattr(hf, "clean_up_tokenization_spaces", False)),
    )


def _special_vocab(model_dir: Path, kind: str, n_rows: int, hf: Any, add_bos: bool, add_eos: bool) -> Any:
    """gguf.SpecialVocab (merges, special ids, chat template), completed from the HF tokenizer."""
    import gguf

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
    return special


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
