"""Tiny random models of every supported architecture, each with a tokenizer of its own kind.

Tokenizers are trained here with the ``tokenizers`` library on a small built-in corpus, one per
vocabulary type the architectures use: byte-level BPE with Llama 3's and Qwen2's split rules,
SentencePiece-style BPE with byte fallback (Llama 2, Phi-3), and a Unigram vocabulary with byte
fallback (what transformers builds from a Gemma GGUF). Models are built from a config with
random weights: nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_WORDS = ("the quick brown fox jumps over lazy dog water cycle moves between oceans atmosphere land heat "
          "from sun evaporates which rises cools condenses into clouds paris capital france berlin germany "
          "machine learning models learn patterns data trained adjusting parameters reduce error examples "
          "recipe pancakes mix flour eggs milk sugar salt select name count orders customers group "
          "positive negative review product phone laptop excellent awful classify sentiment answer").split()


def corpus() -> list[str]:
    """Deterministic text with words, numbers, punctuation, code, whitespace and non-Latin script."""
    lines = []
    for i in range(400):
        w = [_WORDS[(i * 7 + k * 13) % len(_WORDS)] for k in range(12)]
        lines.append(f"{' '.join(w).capitalize()}, {i * 37 % 1000} and {i}.{i % 10}! It's {w[3]}'s {w[5]}?")
    lines += ["def f(x):\n    return x ** 2  # square\n", "Café naïve façade — “quotes” ñ ü ß",
              "日本語のテキスト 中文文本 한국어 русский текст", "  spaces\tand tabs\r\n\n"]
    return lines


CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "gemma": ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
              "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "phi3": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"),
}

# special tokens per chat family: (bos, eos, pad, extra specials); eos is the end-of-turn token
SPECIALS = {
    "chatml": ("<|endoftext|>", "<|im_end|>", "<|endoftext|>", ["<|im_start|>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "gemma": ("<bos>", "<end_of_turn>", "<pad>", ["<eos>", "<start_of_turn>"]),
    "phi3": ("<s>", "<|end|>", "<unk>", ["</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]),
}


def _byte_level_bpe(split: str, specials: list[str], vocab_size: int) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def _spm_style(specials: list[str], vocab_size: int, *, unigram: bool, prefix_space: bool) -> Any:
    """SentencePiece-style: spaces as '▁', byte fallback; BPE (Llama 2, Phi-3) or Unigram (Gemma from GGUF)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    norm = [normalizers.Prepend("▁")] if prefix_space else []
    norm.append(normalizers.Replace(" ", "▁"))
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    if unigram:
        first = Tokenizer(models.Unigram())
        first.normalizer = normalizers.Sequence(norm)
        first.train_from_iterator(corpus(), trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False))
        pieces = json.loads(first.to_str())["model"]["vocab"]
        vocab = [(p, s) for p, s in pieces if p not in bytes_]
        vocab = vocab[:len(specials)] + [(b, 0.0) for b in bytes_] + vocab[len(specials):]
        tok = Tokenizer(models.Unigram(vocab, unk_id=specials.index("<unk>"), byte_fallback=True))
    else:  # trained within words ("▁word" pieces), then the byte tokens join the vocabulary
        first = Tokenizer(models.BPE(unk_token="<unk>"))
        first.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        first.train_from_iterator(corpus(), trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False))
        model = json.loads(first.to_str())["model"]
        vocab = dict(model["vocab"])
        for b in bytes_:
            vocab.setdefault(b, len(vocab))
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence(norm)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


@dataclass(frozen=True)
class TokenizerKind:
    name: str
    chat: str  # key of CHAT_TEMPLATES / SPECIALS
    build: Callable[[list[str]], Any]
    add_bos: bool = False
    # Phi-3's chat tokens swallow the whitespace after them (its tokenizer.json: rstrip; llama.cpp
    # sets the same for any model named phi3, except <unk>, <s> and <|endoftext|>)
    rstrip: tuple[str, ...] = ()


TOKENIZERS = {
    "bpe-llama3": TokenizerKind("bpe-llama3", "llama3", lambda s: _byte_level_bpe(LLAMA3_SPLIT, s, 600), add_bos=True),
    "bpe-qwen2": TokenizerKind("bpe-qwen2", "chatml", lambda s: _byte_level_bpe(QWEN2_SPLIT, s, 600)),
    "spm-bpe": TokenizerKind("spm-bpe", "phi3", lambda s: _spm_style(s, 600, unigram=False, prefix_space=True),
                             rstrip=("</s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>")),
    # Gemma: SentencePiece BPE without a "▁" prefix, BOS added (what the GGUF import rebuilds)
    "spm-bpe-gemma": TokenizerKind("spm-bpe-gemma", "gemma", lambda s: _spm_style(s, 600, unigram=False, prefix_space=False),
                                   add_bos=True),
    # Unigram with byte fallback: llama.cpp merges by score and can only approximate its Viterbi
    "spm-unigram": TokenizerKind("spm-unigram", "gemma", lambda s: _spm_style(s, 600, unigram=True, prefix_space=False),
                                 add_bos=True),
}


def save_tokenizer(kind: str, out: Path) -> Path:
    """Train the tokenizer of ``kind`` and save it as a Hugging Face tokenizer directory."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    spec = TOKENIZERS[kind]
    bos, eos, pad, extra = SPECIALS[spec.chat]
    specials = list(dict.fromkeys([bos, eos, pad, "<unk>", *extra]))
    raw = spec.build(specials)
    if spec.add_bos:
        raw.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, raw.token_to_id(bos))])
    if spec.rstrip:
        raw.add_special_tokens([AddedToken(t, rstrip=True, normalized=False, special=True) for t in spec.rstrip])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, pad_token=pad,
                                  unk_token="<unk>", additional_special_tokens=extra)
    tok.chat_template = CHAT_TEMPLATES[spec.chat]
    tok.save_pretrained(out)
    return out


@dataclass(frozen=True)
class ArchCase:
    """One architecture as a test case: its config class, settings and tokenizer kind."""

    name: str
    config_class: str
    model_class: str
    tokenizer: str
    settings: dict[str, Any] = field(default_factory=dict)
    layers: int = 2


ARCH_CASES: dict[str, ArchCase] = {
    # Llama 3.2: llama3 RoPE scaling, tied embeddings, Llama 3 byte-level BPE
    "llama3.2": ArchCase("llama3.2", "LlamaConfig", "LlamaForCausalLM", "bpe-llama3", dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    # Qwen2.5: q/k/v biases, Qwen2 BPE
    "qwen2.5": ArchCase("qwen2.5", "Qwen2Config", "Qwen2ForCausalLM", "bpe-qwen2", dict(tie_word_embeddings=True)),
    # Qwen3: per-head q/k RMSNorm, head_dim larger than hidden / heads (as Qwen3-0.6B: 128 vs 1024 / 16)
    "qwen3": ArchCase("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "bpe-qwen2", dict(tie_word_embeddings=True, head_dim=64)),
    # Gemma 3: +1 norms, embedding scale, sliding window every other layer, final-logit soft-capping
    "gemma3": ArchCase("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "spm-bpe-gemma", dict(
        head_dim=32, query_pre_attn_scalar=32, sliding_window=16, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_local_base_freq=10000.0,
        rope_theta=1000000.0), layers=3),
    # Phi-4-mini-like Phi-3: fused qkv and gate/up, partial rotary, tied; longrope scaling
    "phi3": ArchCase("phi3", "Phi3Config", "Phi3ForCausalLM", "spm-bpe", dict(
        tie_word_embeddings=True, partial_rotary_factor=0.75, original_max_position_embeddings=512,
        rope_scaling={"type": "longrope", "long_factor": [1.0 + i / 4 for i in range(12)],
                      "short_factor": [1.0 + i / 40 for i in range(12)]})),
    # SmolLM3: every fourth layer without RoPE
    "smollm3": ArchCase("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", "bpe-llama3", dict(tie_word_embeddings=True),
                        layers=4),
}


def make_arch_model(case: ArchCase, out: Path, tokenizer_dir: Path, *, hidden: int = 128, seed: int = 0,
                    init_std: float = 0.2) -> Path:
    """Write a tiny random ``case`` model with the tokenizer in ``tokenizer_dir`` to ``out``."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=case.layers, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=1024, initializer_range=init_std, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    settings.update(case.settings)
    config = getattr(transformers, case.config_class)(**settings)
    torch.manual_seed(seed)
    model = getattr(transformers, case.model_class)(config)
    with torch.no_grad():  # norms away from 1 (Gemma's are stored as offsets from 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out
