"""Verify an ORT-format model as onnxruntime loads it: whole-sequence and cached-step logits of
``model.ort`` against the PyTorch reference (the ONNX export's bars), the saved tokenizer, and a
required-operators config that names operators."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from edgeft.core.errors import EdgeftError, one_line
from edgeft.core.records import Check
from export.onnx.reference import Reference
from export.onnx.verify import Bars, OrtLM, graph_checks, graph_figures, tokenizer_matches
from export.ort.write import required_operators
from runtime.mobile import ORT_MODEL


def verify_ort(directory: Path, refs: Sequence[Reference], bars: Bars, *,
               tokenizer: Any) -> tuple[list[Check], dict[str, Any]]:
    """Compare ``directory/model.ort`` with the PyTorch reference; (checks, figures)."""
    figures = measure_ort(directory, refs, tokenizer)
    return judge_ort(figures, bars), figures


def measure_ort(directory: Path, refs: Sequence[Reference], tokenizer: Any) -> dict[str, Any]:
    figures: dict[str, Any] = {"required_operators": required_operators(directory)}
    try:
        lm = OrtLM(directory / ORT_MODEL)
    except EdgeftError:
        raise
    except Exception as e:  # onnxruntime refuses a damaged or unsupported ORT file
        figures["error"] = f"onnxruntime cannot load {ORT_MODEL}: {one_line(e)}"
        return figures
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    figures.update(graph_figures(lm, refs, pad))
    figures["tokenizer_roundtrip"] = tokenizer_matches(directory, tokenizer)
    return figures


def judge_ort(figures: dict[str, Any], bars: Bars) -> list[Check]:
    """The checks an ORT-format model's figures must pass (pure)."""
    if "logits" not in figures:
        return [Check("ort_format_loads", False, True, "==")]
    return [*graph_checks(figures, bars),
            Check("required_operators_listed", len(figures["required_operators"]), 1, ">="),
            Check("tokenizer_roundtrip", figures["tokenizer_roundtrip"], True, "==")]
