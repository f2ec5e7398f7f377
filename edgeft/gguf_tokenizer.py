"""A GGUF's SentencePiece-style vocabulary as the Hugging Face tokenizer llama.cpp would agree with.

llama.cpp's "llama" vocabulary (Llama 2, Gemma, Phi-3 GGUFs) merges adjacent pieces in order of
the merged piece's score. transformers rebuilds some of these (Gemma) as a Unigram model over the
same scores, which segments differently: on the Gemma 3 270M GGUF it disagreed with llama.cpp on
23 of 24 sample texts (" world" became "▁w", "or", ...), so a fine-tune would learn a tokenisation
the base model never saw. Here the vocabulary becomes a byte-fallback BPE whose merges follow the
scores (transformers' ``generate_merges``), the tokenisation sentencepiece and llama.cpp produce.
"""

from __future__ import annotations

from typing import Any

CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType values (llama.cpp's llama_token_type)


def spm_bpe_tokenizer(fields: dict[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` from a GGUF's ``tokenizer.ggml.*`` arrays (model "llama")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import generate_merges

    tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
    scores: list[float] = [float(s) for s in fields["tokenizer.ggml.scores"]]
    types: list[int] = [int(t) for t in fields["tokenizer.ggml.token_type"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    # control and user-defined tokens are matched whole before the merges; keep them out of them
    normal = {t: s for t, s, k in zip(tokens, scores, types) if k not in (CONTROL, USER_DEFINED)}
    merges = generate_merges(vocab, normal)
    unk_id = fields.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))

    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    return tok


def split_rule_pre_tokenizer(pre: str | None) -> Any | None:
    """The byte-level pre-tokenizer for llama.cpp's split rule ``pre``, or None to keep transformers'.

    Only rules whose regex ``export.gguf.tables`` knows are rebuilt; GPT-2's own ("gpt-2",
    "smollm") is what transformers already applies.
    """
    from tokenizers import Regex, pre_tokenizers

    from export.gguf.tables import SPLIT_REGEX_PRE

    regex = next((rx for rx, name in SPLIT_REGEX_PRE.items() if name == pre and name != "gpt-2"), None)
    if regex is None:
        return None
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
