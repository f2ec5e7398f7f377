"""Checks made before any weights are loaded for an ExecuTorch program: the quantization asked for, the
architecture, the program length, the output path, the source directory, executorch being installed,
and the disk space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeft.core.errors import ConfigError, EdgeftError, one_line
from edgeft.core.fsutil import ensure_free_space
from export.onnx.plan import inspect_model_dir
from export.onnx.reference import GREEDY_TOKENS, sample_prompts
from runtime.modelfiles import load_tokenizer

QUANTIZATIONS = ("8da8w", "8da4w", "fp32")
# Quantizations whose weights get the outlier smoothing (export/smoothing.py) when calibration rows are
# given: int8 per-token activations meet SmolLM2's first-token outliers (~3000 against a median of ~1)
# in every linear layer, and the down projection's are the largest; the fold is exact.
SMOOTHED_QUANTIZATIONS = {"8da8w": True, "8da4w": True}
# Architectures whose transformers 4.57 model exports with edgeft's static-cache wrapper (write.py):
# llama is proved by tests/test_mobile.py; the others share its decoder layer and cache layout.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
MAX_SEQ_LEN_DEFAULT = 512


def check_request(quantize: str, max_seq_len: int) -> None:
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZATIONS)}")
    if not 16 <= max_seq_len <= 8192:
        raise ConfigError(f"--max-seq-len {max_seq_len}: must be between 16 and 8192")


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise EdgeftError(f"--output {output} exists and is a file; ExecuTorch exports are directories")
    if output.exists() and not overwrite:
        raise EdgeftError(f"--output {output} already exists; pass --overwrite to replace it")


def check_executorch() -> None:
    """executorch and torchao import (the ``mobile`` extra), or a one-line error."""
    try:
        import executorch.exir  # noqa: F401
        import torchao  # noqa: F401
    except ImportError as e:
        raise EdgeftError(f"executorch export needs the mobile extra ({one_line(e)}); "
                          "pip install 'edgeft[mobile]'") from None


def plan_executorch(model_dir: Path, output: Path, quantize: str, max_seq_len: int, overwrite: bool) -> Any:
    """Every check that needs no weights, all before work; returns the tokenizer."""
    check_request(quantize, max_seq_len)
    check_output(output, overwrite)
    source = inspect_model_dir(model_dir)
    if source.model_type not in ARCHITECTURES:
        raise EdgeftError(f"--model {model_dir}: model_type {source.model_type!r} is not supported by the ExecuTorch "
                          f"export (supported: {', '.join(ARCHITECTURES)}); use export onnx --format genai or ort")
    check_executorch()
    tokenizer = load_tokenizer(str(model_dir))
    needed = max(len(s.prompt) for s in sample_prompts(tokenizer)) + GREEDY_TOKENS + 1
    if max_seq_len < needed:  # the verification samples must fit the program's cache, or lowering is wasted
        raise ConfigError(f"--max-seq-len {max_seq_len}: the verification samples need {needed} positions; "
                          f"use at least {needed}")
    # fp32 program + the quantized copy of the weights while lowering, generously.
    ensure_free_space(output, int(source.n_params * 4 * 1.5) + 64 * 2**20, "the ExecuTorch export")
    return tokenizer
