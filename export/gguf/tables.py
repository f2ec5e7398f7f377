"""Data tables for the GGUF export: architectures, output types, pre-tokenizers, chat formats.

Pure data and tiny pure functions, no I/O: the stages of ``export/gguf/`` read these rows.
Each row says where its facts come from. Tensor names are not here: gguf-py's
``TensorNameMap`` maps Hugging Face names to GGUF names.

Adding an architecture is one ``ARCHITECTURES`` row: the llama.cpp graph it becomes and, where
needed, a tensor transform (``transforms.py``) and the checks, metadata keys and extra tensors
of ``arch_hooks.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from export.gguf import arch_hooks as H
from export.gguf.transforms import TensorTransform, gemma_norm_plus_one, llama_qk_rope_layout

Check = Callable[[dict[str, Any]], list[str]]
Metadata = Callable[[Any, dict[str, Any]], None]
ExtraTensors = Callable[[Path, dict[str, Any]], list[tuple[str, np.ndarray]]]

# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face ``architectures[0]`` becomes a llama.cpp model."""

    gguf_arch: gguf.MODEL_ARCH
    # Applied to every tensor on its way in (the model's ``modify_tensors`` in llama.cpp's
    # convert_hf_to_gguf.py); None: tensors are written as Hugging Face stores them.
    transform: TensorTransform | None = None
    # rope_scaling kinds the llama.cpp graph can express for this architecture
    rope_types: tuple[str, ...] = ("default", "linear", "yarn")
    check: Check | None = None  # config -> problems: settings llama.cpp cannot express
    metadata: Metadata | None = None  # (writer, config): the {arch}.* keys beyond the common ones
    extra_tensors: ExtraTensors | None = None  # (model dir, config) -> tensors HF does not store
    # llama.cpp applies some tokenizer rules by model name (llama-vocab.cpp: Phi-3's chat tokens
    # swallow the whitespace after them); the name written carries this marker
    name_marker: str | None = None


ARCHITECTURES: dict[str, ArchSpec] = {
    # Llama 2/3/3.2, TinyLlama, SmolLM/SmolLM2 (convert_hf_to_gguf.py: LlamaModel); q/k rows
    # reordered to llama.cpp's RoPE layout (LlamaModel.permute); llama3 RoPE scaling as the
    # rope_freqs tensor (LlamaModel.generate_extra_tensors)
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, transform=llama_qk_rope_layout,
                                 rope_types=("default", "linear", "yarn", "llama3"), extra_tensors=H.llama3_rope_freqs),
    # Mistral 7B is a llama graph in llama.cpp (LlamaModel handles MistralForCausalLM)
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, transform=llama_qk_rope_layout),
    # Qwen2/Qwen2.5: q/k/v biases, neox RoPE kept in the HF layout (conversion/qwen.py: Qwen2Model)
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2),
    # Qwen3: per-head q/k RMSNorm (attn_q_norm/attn_k_norm), explicit head_dim, neox RoPE in the HF
    # layout (conversion/qwen.py: Qwen3Model extends Qwen2Model)
    "Qwen3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3),
    # Gemma 3 text (270M, 1B; conversion/gemma.py: Gemma3Model, src/models/gemma3.cpp): norms stored
    # as 1 + w, embeddings scaled by sqrt(n_embd) inside llama.cpp's graph, per-layer sliding window
    # with its own RoPE base, final-logit soft-capping, queries scaled by 1/sqrt(head_dim)
    "Gemma3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.GEMMA3, transform=gemma_norm_plus_one,
                                  rope_types=("default", "linear"), check=H.gemma3_check, metadata=H.gemma3_metadata),
    # Phi-3/3.5/Phi-4-mini (conversion/phi.py: Phi3MiniModel, src/models/phi3.cpp): fused qkv_proj and
    # gate_up_proj kept fused (attn_qkv, ffn_up of 2 x n_ff), neox RoPE over partial_rotary_factor of
    # each head, longrope factor tables and attention factor
    "Phi3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.PHI3, rope_types=("default",) + H.PHI3_LONGROPE,
                                check=H.phi3_check, metadata=H.phi3_metadata, extra_tensors=H.phi3_rope_factors,
                                name_marker="phi3"),
    # SmolLM3 (conversion/llama.py: SmolLM3Model extends LlamaModel; src/models/smollm3.cpp): llama
    # q/k layout, every 4th layer without RoPE (hard-coded in llama.cpp, checked against no_rope_layers)
    "SmolLM3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.SMOLLM3, transform=llama_qk_rope_layout, check=H.smollm3_check),
}

# HF buffers that are recomputed at load time and have no GGUF tensor.
SKIPPED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)


# --------------------------------------------------------------------------------------------
# Output types
# --------------------------------------------------------------------------------------------

LFT = gguf.LlamaFileType
F32, F16, BF16, Q8_0, Q6_K = (gguf.GGMLQuantizationType[n] for n in ("F32", "F16", "BF16", "Q8_0", "Q6_K"))


@dataclass(frozen=True)
class Precision:
    """A lossless precision the writer stores tensors in (gguf-py constants.py: GGML_QUANT_SIZES)."""

    file_type: gguf.LlamaFileType  # general.file_type of a file whose 2-D tensors are in it
    ggml_type: gguf.GGMLQuantizationType
    numpy_dtype: type  # the array handed to the writer; bf16 as raw 16-bit patterns (numpy has none)
    nbytes: int  # per value


PRECISIONS: dict[str, Precision] = {
    "f32": Precision(LFT.ALL_F32, F32, np.float32, 4),
    "f16": Precision(LFT.MOSTLY_F16, F16, np.float16, 2),
    "bf16": Precision(LFT.MOSTLY_BF16, BF16, np.uint16, 2),
}


@dataclass(frozen=True)
class QuantSpec:
    """One ``--type``: how it is produced, what it keeps at higher precision, the bar it must meet."""

    file_type: gguf.LlamaFileType
    direct: bool  # f32/f16/bf16 are written directly; the others go through llama.cpp's quantizer
    # token_embd type (tied models reuse it as the output projection); None: llama.cpp's choice
    embed_type: gguf.GGMLQuantizationType | None
    # (regex on GGUF tensor names, type) kept above the file type (llama.cpp tt_overrides)
    keep: tuple[tuple[str, gguf.GGMLQuantizationType], ...]
    min_top1: float  # teacher-forced top-1 agreement with the merged PyTorch model
    max_mean_kl: float  # mean KL(PyTorch || GGUF) in nats
    bits_per_weight: float  # for the disk-space estimate only (upper end)
    # quantized with an importance matrix when calibration rows are given (llama.cpp's q8_0 ignores one;
    # for the others benchmarks/quant_fidelity.py measures with and without, table there)
    imatrix: bool = False
    # weights smoothed first (export/smoothing.py: outlier activations folded into ffn_down, exact)
    # when calibration rows are given; measured per type by benchmarks/quant_fidelity.py
    smooth: bool = False
    # which layers are folded (export.smoothing.LAYER_SCOPES): "all", or "outlying" (the layers that
    # carry outliers themselves; measured in export/smoothing.py)
    smooth_layers: str = "all"
    # weights rounded onto q8_0's grid by GPTQ on the calibration rows (export/gguf/gptq.py), after the
    # smoothing; only for q8_0, whose grid llama.cpp then reproduces byte for byte
    gptq: bool = False


# Per-tensor precision, measured on SmolLM2-135M-Instruct (30 layers, n_embd 576, GQA 9/3
# heads, tied embeddings) over the 745 teacher-forced positions of LOGIT_SAMPLES + a chat turn,
# llama.cpp CPU (llama-cpp-python 0.3.36). One standard error of top-1 is ~0.8 points here;
# mean KL is the steadier figure and the one the choices were made on.
#
#   type    kept above the type                 MiB   top-1   mean KL
#   q8_0    (llama.cpp default)               138.1  0.945   0.0052
#   q8_0    token_embd f16                    163.4  0.950   0.0051   +25 MiB for nothing
#   q8_0    attn_v f16                        141.1  0.948   0.0040   <- chosen (+3 MiB, -23 % KL)
#   q8_0    attn_v + attn_output f16          150.0  0.957   0.0035
#   q8_0    attn_q/k f16                      150.0  0.941   0.0051
#   q8_0    attn_q/k/v f16                    152.9  0.950   0.0034
#   q8_0    ffn_down f16 (+ token_embd f16)   187.1  0.964   0.0034
#   q8_0    layers 0-2, 28, 29 f16            153.9  0.954   0.0040
#   q4_k_m  (llama.cpp default)               100.6  0.859   0.0701
#   q4_k_m  token_embd f16                    125.9  0.870   0.0728   +25 MiB, KL no better
#   q4_k_m  attn_v f16                        104.2  0.879   0.0543
#   q4_k_m  attn_v f16 + ffn_down q8_0        113.8  0.878   0.0407   <- chosen (+13 %, -42 % KL)
#   q4_k_m  ffn_down q5_0                     100.7  0.851   0.0975
#   q6_k    (llama.cpp default)               132.0  0.929   0.0162
#   q5_k_m  (llama.cpp default)               106.9  0.860   0.0852
#
# What the figures say:
# - token_embd/output: llama.cpp already keeps a tied embedding at q8_0 in every k-quant
#   (576 is not a multiple of 256); raising it to f16 costs 18 % of the file and buys nothing.
# - attn_v is the sensitive tensor: with GQA each value row feeds three query heads, and it is
#   only 2.5 % of the weights. f16 for it is the best agreement per byte in every type.
# - llama.cpp's CPU kernels quantize the activations too (to 8 bits per 32 or 256 values) for
#   every quantized weight, so half of q8_0's loss is not in the file at all (a PyTorch
#   simulation: q8_0 weights alone 0.968 top-1, q8_0 activations alone 0.973, both 0.948). The
#   loss is spread evenly over the layers (a per-layer scan), so no small set of tensors brings
#   q8_0 to 98 % top-1 on this model; only f16/bf16 do.
# - n_embd 576 is not a multiple of 256, so the k-quants fall back to q5_0 (q4_k_m), q5_1
#   (q5_k_m) or q8_0 (q6_k) for everything but ffn_down; q5_k_m ends up no better than q4_k_m.
#
# Outlier smoothing (export/smoothing.py, ``smooth`` column), measured on an SST-2 QLoRA fine-tune
# of SmolLM2-135M, 100 dev rows (positions from the review on), calibration = 229 training rows:
#   q8_0    (attn_v f16)                  top-1 0.953  KL 0.0074  ->  smoothed 0.954 / 0.0065 (-12 %)  <- on
#   q4_k_m  (keep + imatrix)              top-1 0.884  KL 0.0481  ->  smoothed 0.927 / 0.0594 (+23 %)
#                                                             outlying layers only 0.927 / 0.0523 (+9 %)  <- on
# q4_k_m is folded only in the layers that carry outliers (smooth_layers="outlying"; why in
# export/smoothing.py). On all 872 dev rows against the unmerged model (benchmarks/QUANTIZATION.md, "The full
# SST-2 dev set"; edgeft bench), task accuracy against the reference: imatrix only -2.4 points, all layers
# smoothed -1.5, outlying layers -0.5; greedy answers equal to the reference's 0.948 / 0.967 / 0.975.
# q5_k_m and q6_k were not measured smoothed and stay off. On Gemma 3 270M's SST-2 fine-tune, whose MLP has
# no massive activations, a forced fold made q8_0 worse (KL 0.0051 -> 0.0088, 32 dev rows), so by
# default the fold applies only above export.smoothing.MASSIVE_RATIO.
#
# GPTQ onto q8_0's grid (export/gguf/gptq.py, ``gptq`` column), after the smoothing, same fine-tune,
# calibration = 229 training rows; benchmarks/exact_transforms.py, 100 dev rows, 4465 positions:
#   q8_0 (smoothed)              top-1 0.9740  KL 0.00409  answers = ref 0.99
#   q8_0 + GPTQ                  top-1 0.9792  KL 0.00276 (-33 %)  answers = ref 1.00
# (every GPTQ tensor stored by llama.cpp byte for byte; per-tensor output error 0.15x round-to-nearest)
# but on all 872 dev rows against the unmerged model (edgeft bench; benchmarks/QUANTIZATION.md, "GPTQ onto
# q8_0's grid")
#   q8_0 (smoothed)              top-1 0.9729  KL 0.00355  task accuracy +0.1 points (-0.5..+0.7)
#   q8_0 + GPTQ                  top-1 0.9744  KL 0.00335  task accuracy -0.5 points (-1.1..+0.1)
# a gain within the noise for ~2 min more per export (252 s against 124 s with a 100-row verification):
# opt-in (--gptq), and tried by --type auto.
#
# q8_0's smoothing measured again on the fine-tune of the ONNX rows of benchmarks/QUANTIZATION.md (SST-2, 229
# calibration rows): `edgeft export gguf --type q8_0 --no-smooth --calibration train.jsonl --eval-data
# dev-verify.jsonl` verifies at top-1 0.9745, KL 0.00359 on 256 dev rows, but all 872 dev rows against the
# unmerged model (edgeft bench, benchmarks/QUANTIZATION.md "q8_0 without the smoothing") do not support dropping
# the fold: top-1 0.9530 -> 0.9697, KL 0.00375 -> 0.00450, task accuracy ±0.0 (-0.5..+0.5) -> -1.0 points
# (-1.7..-0.5). It stays on. With each context scored once (the instruction every row starts with no longer
# counted 872 times) the same files give top-1 0.9603 -> 0.9611 and KL 0.00380 -> 0.00372: the top-1 gap was one
# close call in the shared instruction; the task loss stands. (Keeping the down projections that read the
# massive activations at f16, as ONNX int8 computes them on float activations, was tried on q8_0 and q4_k_m and
# is not in the product: it did not lower q8_0's KL and lowered q4_k_m's top-1.)
# Where q8_0's remaining loss is (benchmarks/eight_bit_loss.py; benchmarks/QUANTIZATION.md "Why 8-bit stops near
# 96% top-1"): llama.cpp's kernels round the activations onto 8-bit blocks of 32 as well, the larger share, and
# no small set of tensors holds it. attn_q, attn_k and ffn_up in f16 (``--tensor-type``) verify at top-1 0.969
# on the fine-tune's 256 dev rows for 0.68x the f16 file's bytes, against the default's 0.958 (an earlier run)
# at 0.55x: the user's trade to make, not the default.
#
# The bars: f32/f16/bf16 near-exact; q8_0 and q6_k "high" with room for a fine-tuned model
# (which quantizes worse than the base: the demo's merged adapter gave q4_k_m top-1 0.854 and KL
# 0.125 against 0.878 / 0.041 on the base); q5_k_m and q4_k_m are *reported* figures whose bar
# only catches a broken export (wrong RoPE permutation, tokenizer or tensor: top-1 ~0.1).
_KEEP_V = (r"attn_v\.weight", F16)
_KEEP_DOWN = (r"ffn_down\.weight", Q8_0)
QUANT_TYPES: dict[str, QuantSpec] = {
    "f32": QuantSpec(LFT.ALL_F32, direct=True, embed_type=None, keep=(),
                     min_top1=0.99, max_mean_kl=1e-3, bits_per_weight=32),
    "f16": QuantSpec(LFT.MOSTLY_F16, direct=True, embed_type=None, keep=(),
                     min_top1=0.99, max_mean_kl=1e-3, bits_per_weight=16),
    "bf16": QuantSpec(LFT.MOSTLY_BF16, direct=True, embed_type=None, keep=(),
                      min_top1=0.99, max_mean_kl=2e-3, bits_per_weight=16),
    "q8_0": QuantSpec(LFT.MOSTLY_Q8_0, direct=False, embed_type=None, keep=(_KEEP_V,),
                      min_top1=0.93, max_mean_kl=0.02, bits_per_weight=16, smooth=True),
    "q6_k": QuantSpec(LFT.MOSTLY_Q6_K, direct=False, embed_type=None, keep=(_KEEP_V,),
                      min_top1=0.85, max_mean_kl=0.06, bits_per_weight=16, imatrix=True),
    "q5_k_m": QuantSpec(LFT.MOSTLY_Q5_K_M, direct=False, embed_type=None, keep=(_KEEP_V, _KEEP_DOWN),
                        min_top1=0.70, max_mean_kl=0.30, bits_per_weight=16, imatrix=True),
    "q4_k_m": QuantSpec(LFT.MOSTLY_Q4_K_M, direct=False, embed_type=None, keep=(_KEEP_V, _KEEP_DOWN),
                        min_top1=0.70, max_mean_kl=0.30, bits_per_weight=16, imatrix=True, smooth=True,
                        smooth_layers="outlying"),
}


# Types a user may give single tensors (``--tensor-type NAME=TYPE``, as llama-quantize's own flag).
OVERRIDE_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0")


def parse_tensor_type(value: str) -> tuple[str, gguf.GGMLQuantizationType]:
    """``NAME=TYPE`` -> (NAME, GGML type). NAME is a regular expression searched in GGUF tensor names
    (``blk.3.ffn_up.weight``), as llama.cpp's tensor-type overrides are; ValueError says what is wrong."""
    name, sep, qtype = value.partition("=")
    if not sep or not name or not qtype:
        raise ValueError(f"{value!r}: expected NAME=TYPE, e.g. ffn_up=f16")
    if qtype.lower() not in OVERRIDE_TYPES:
        raise ValueError(f"{value!r}: unknown type {qtype!r}; choose one of {', '.join(OVERRIDE_TYPES)}")
    try:
        re.compile(name)
    except re.error as e:
        raise ValueError(f"{value!r}: {name!r} is not a regular expression ({e})") from None
    return name, gguf.GGMLQuantizationType[qtype.upper()]


@dataclass(frozen=True)
class QuantOptions:
    """How one quantization is made beyond its type: what ``--type auto`` searches over, and what
    the benchmark compares with llama.cpp's plain quantization."""

    keep: bool = True  # the type's higher-precision tensors (QuantSpec.keep); False: llama.cpp's plain mix
    # the user's per-tensor types (--tensor-type), ahead of the type's keep: llama.cpp takes the first match
    tensor_types: tuple[tuple[str, gguf.GGMLQuantizationType], ...] = ()
    imatrix: bool | None = None  # None: the type's table choice (QuantSpec.imatrix) when calibration rows exist
    smooth: bool | None = None  # None: the type's table choice (QuantSpec.smooth) when calibration rows exist
    gptq: bool | None = None  # None: the type's table choice (QuantSpec.gptq) when calibration rows exist

    def overrides(self, spec: QuantSpec) -> tuple[tuple[str, gguf.GGMLQuantizationType], ...]:
        """(regex on GGUF tensor names, type) handed to llama.cpp's quantizer, first match wins."""
        return self.tensor_types + (spec.keep if self.keep else ())

    def use_gptq(self, spec: QuantSpec) -> bool:
        return spec.gptq if self.gptq is None else self.gptq

    def use_imatrix(self, spec: QuantSpec) -> bool:
        return spec.imatrix if self.imatrix is None else self.imatrix

    def use_smooth(self, spec: QuantSpec) -> bool:
        return spec.smooth if self.smooth is None else self.smooth


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

# The byte-level BPE split regexes llama.cpp implements, keyed by ``tokenizer.ggml.pre``
# (llama-vocab.cpp, llm_tokenizer_bpe). Hugging Face writes them in tokenizer.json as a
# ``Split`` pre-tokenizer (Llama 3, Qwen2) or implies the GPT-2 one with ``ByteLevel(use_regex)``.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Split regex found in tokenizer.json -> tokenizer.ggml.pre
SPLIT_REGEX_PRE: dict[str, str] = {
    LLAMA3_REGEX: "llama-bpe",  # Llama 3.x (llama.cpp also sets ignore_merges for it)
    QWEN2_REGEX: "qwen2",  # Qwen2/2.5
    GPT2_REGEX: "gpt-2",
}


def pick_bpe_pre(split_regexes: list[str], byte_level_regex: bool, individual_digits: bool,
                 multi_digit_tokens: bool, clean_up_spaces: bool) -> tuple[str, str]:
    """``tokenizer.ggml.pre`` for a byte-level BPE tokenizer, and why it was picked.

    llama.cpp has no generic pre-tokenizer: the value names one of its built-in split rules.
    Known regexes map exactly. The GPT-2 rule exists twice in llama.cpp: "gpt-2" and
    "smollm" (= split digits one by one first, keep spaces on decode). A SmolLM/StarCoder
    tokenizer (``Digits(individual_digits)`` + GPT-2) is "smollm"; so is a bare GPT-2-regex
    tokenizer whose vocabulary has no multi-digit token (the digit split is then a no-op, as for
    SmolLM2 tokenizers that transformers rebuilt from a GGUF) unless it asks for
    clean-up of spaces on decode, which is "gpt-2". An unknown regex gets the nearest rule by
    its number handling (``\\p{N}{1,3}`` -> llama-bpe, ``\\p{N}`` -> qwen2, else gpt-2); the
    tokenisation check after export then says whether that was good enough.
    """
    for rx in split_regexes:
        if rx in SPLIT_REGEX_PRE:
            return SPLIT_REGEX_PRE[rx], "known split regex"
    if split_regexes:
        rx = split_regexes[0]
        if r"\p{N}{1,3}" in rx:
            return "llama-bpe", "unknown split regex; nearest: numbers in groups of 3"
        if re.search(r"\\p\{N\}(?![+{])", rx):
            return "qwen2", "unknown split regex; nearest: single-digit numbers"
        return "gpt-2", "unknown split regex; nearest: GPT-2"
    if byte_level_regex:
        if individual_digits:
            return "smollm", "ByteLevel GPT-2 regex with individual digits"
        if not multi_digit_tokens and not clean_up_spaces:
            return "smollm", "ByteLevel GPT-2 regex, no multi-digit tokens, no space clean-up"
        return "gpt-2", "ByteLevel GPT-2 regex"
    return "gpt-2", "no split rule found; GPT-2 assumed"


# --------------------------------------------------------------------------------------------
# Chat formats for the Ollama Modelfile
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatFormat:
    """A chat template family recognised by a marker string, written as an Ollama Go template."""

    name: str
    marker: str  # present in the Jinja chat template
    ollama_template: str
    stops: tuple[str, ...]  # end-of-turn strings (plus the EOS token, added by the writer)


CHAT_FORMATS: tuple[ChatFormat, ...] = (
    ChatFormat(
        "chatml",  # SmolLM2, Qwen2, many fine-tunes
        "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n",
        ("<|im_end|>", "<|im_start|>"),
    ),
    ChatFormat(
        "llama3",  # Llama 3.x instruct
        "<|start_header_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>", "<|start_header_id|>"),
    ),
    ChatFormat(
        "gemma",  # Gemma 2/3 instruct: the assistant's role is "model"
        "<start_of_turn>",
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        ("<end_of_turn>", "<start_of_turn>"),
    ),
    ChatFormat(
        "phi3",  # Phi-3, Phi-3.5, Phi-4-mini
        "<|end|>",
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        ("<|end|>", "<|user|>", "<|assistant|>"),
    ),
    ChatFormat(
        "zephyr",  # TinyLlama-Chat
        "<|user|>",
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n",
        ("</s>", "<|user|>"),
    ),
)


def find_chat_format(template: str | None) -> ChatFormat | None:
    """The chat family of a Jinja template, or None when it is not one we can translate."""
    if not template:
        return None
    return next((f for f in CHAT_FORMATS if f.marker in template), None)


# --------------------------------------------------------------------------------------------
# Verification inputs
# --------------------------------------------------------------------------------------------

# Tokenisation samples: prose, numbers, code, whitespace runs, unicode (accents, CJK, emoji,
# combining marks), and text with special tokens written out. The chat-formatted prompt is
# added at run time from the model's own template.
TOKENIZER_SAMPLES: tuple[str, ...] = (
    "Hello, world! How are you today?",
    "The year 2024 had 366 days; 3.14159 * 2 = 6.28318, and 1,000,000 is a million.",
    "  leading spaces, trailing spaces   \n\n\tand a tab\r\nand CRLF\n   \n",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12))\n",
    "Café naïve façade — “quotes” ‘single’ … ñ ü ß Ærøskøbing",
    "日本語のテキストと中文文本, 한국어 텍스트, Ελληνικά, русский текст, עברית, العربية",
    "emoji 🙂🚀👍🏽 and zwj 👨‍👩‍👧 and e\u0301 combining",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "don't won't it's we'll they've I'm you'd",
    "",
)

# Teacher-forced logit comparison: a few hundred positions of ordinary text in different
# registers, plus one chat turn (added at run time) so chat-format positions are covered.
LOGIT_SAMPLES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. Meanwhile, in the village, the baker was "
    "preparing bread for the morning market, as she had done every day for thirty years. "
    "Her customers knew her by name and always asked about her garden.",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight "
    "to synthesize foods from carbon dioxide and water. It generally involves the green pigment "
    "chlorophyll and generates oxygen as a by-product.",
    "To install the package, run pip install requests, then import it in your script:\n\n"
    "import requests\nresponse = requests.get('https://example.com')\nprint(response.status_code)\n",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of "
    "Spain. Rome is the capital of Italy. Lisbon is the capital of Portugal.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon. The Apollo 11 mission "
    "launched on July 16 and landed four days later; the crew returned safely on July 24.",
    "Once upon a time, a small robot lived in a workshop full of tools. Every night, after the "
    "inventor went to sleep, the robot would quietly fix the broken toys left on the shelves.",
    "Dear team,\n\nThank you all for your hard work this quarter. Sales grew by 12% compared with "
    "last year, and customer satisfaction reached its highest level since we started measuring it. "
    "Please join us on Friday at 4 pm for a small celebration in the main hall.\n\nBest regards,\nAnna",
    "The water cycle describes how water moves between the oceans, the atmosphere and the land. "
    "Heat from the sun evaporates water, which rises, cools and condenses into clouds. When the "
    "droplets grow heavy enough, they fall as rain or snow, flow into rivers and return to the sea.",
    "Recipe for pancakes: mix two cups of flour, two eggs, one and a half cups of milk, a spoon of "
    "sugar and a pinch of salt. Let the batter rest for ten minutes, then cook each pancake in a hot "
    "pan until bubbles form on the surface, flip it, and cook for another minute.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON customers.id = orders.customer_id "
    "WHERE orders.created_at > '2023-01-01' GROUP BY name ORDER BY orders DESC LIMIT 10;",
    "Regular exercise improves heart health, strengthens muscles and bones, and helps control "
    "weight. Experts recommend at least 150 minutes of moderate activity every week, such as brisk "
    "walking, cycling or swimming, combined with two days of strength training.",
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press. Books became cheaper, literacy "
    "spread across Europe, and new ideas travelled faster than ever before.",
    "Q: How many legs does a spider have?\nA: A spider has eight legs.\nQ: What do bees make?\n"
    "A: Bees make honey and wax.\nQ: Which planet is closest to the Sun?\nA: Mercury.",
    "Machine learning models learn patterns from data. A model is trained by adjusting its "
    "parameters to reduce the error on examples, and then evaluated on data it has never seen to "
    "estimate how well it will generalize to new inputs.",
)

CHAT_PROBE = "Explain in a few sentences why the sky is blue."  # an answer longer than the token budget
GREEDY_NEW_TOKENS = 32
