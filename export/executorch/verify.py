"""Verify an ExecuTorch program by running it with executorch's Python runtime (XNNPACK) against the
PyTorch fp32 reference: whole-sequence logits, cached decode steps through the program's own static
cache, the greedy continuation, and the saved tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from edgeft.core.errors import EdgeftError
from edgeft.core.records import Check
from export.drive import BackendLM
from export.onnx.reference import Reference
from export.onnx.verify import Bars, graph_checks, graph_figures, tokenizer_matches
from runtime.backends.executorch_backend import ExecutorchBackend

# Bars against PyTorch fp32, as the ONNX variants':
# - fp32: XNNPACK's fp32 kernels measured max |logit diff| 5e-6 on the tiny test model (operator order only);
#   the ONNX fp32 bars apply unchanged.
# - 8da8w: int8 weights (one scale per output channel) and int8 activations per token: the ONNX int8 bars
#   (top-1 0.93, KL 0.02).
# - 8da4w: int4 weights (groups of 32) and int8 activations per token: the ONNX int4 bars (top-1 0.90, KL 0.05).
BARS: dict[str, Bars] = {
    "fp32": Bars(top1=0.99, mean_kl=1e-4, atol=1e-3, greedy_exact=True),
    "8da8w": Bars(top1=0.93, mean_kl=0.02),
    "8da4w": Bars(top1=0.90, mean_kl=0.05),
}
VERIFY_THREADS = 1


def verify_program(directory: Path, refs: Sequence[Reference], bars: Bars, *,
                   tokenizer: Any) -> tuple[list[Check], dict[str, Any]]:
    """Run ``directory/model.pte`` on the reference samples; (checks, figures)."""
    try:
        backend = ExecutorchBackend(directory, threads=VERIFY_THREADS)
    except EdgeftError as e:
        figures: dict[str, Any] = {"error": e.format_message()}
        return judge_program(figures, bars), figures
    figures = graph_figures(BackendLM(backend), refs, pad=0)
    figures["tokenizer_roundtrip"] = tokenizer_matches(directory, tokenizer)
    return judge_program(figures, bars), figures


def judge_program(figures: dict[str, Any], bars: Bars) -> list[Check]:
    """The checks a program's figures must pass (pure); ``kv_greedy_match`` is its greedy continuation."""
    if "logits" not in figures:
        return [Check("executorch_loads", False, True, "==")]
    checks = graph_checks(figures, bars)
    if not bars.greedy_exact:  # quantized: report the greedy agreement, judged by top-1 and KL above
        checks.append(Check("greedy_match_samples", figures["kv_cache"]["greedy_match_samples"]))
    return [*checks, Check("tokenizer_roundtrip", figures["tokenizer_roundtrip"], True, "==")]
