"""Accuracy bars an artifact must meet against the unmerged reference (pure data and logic).

Top-1 next-token agreement, teacher-forced on the evaluation rows, by storage precision:

    class      minimum top-1   precisions
    lossless   0.995           merged fp32/fp16, ONNX fp32, GGUF f32/f16
    8-bit      0.98            ONNX int8 and fp16 (fp16 compute), GGUF q8_0/q6_k/bf16, merged bf16, ExecuTorch 8da8w
    4-bit      0.95            ONNX int4, GGUF q4_*/q5_*/q3_*/q2_* and anything else quantized

Task accuracy (exact match of normalised greedy answers) may fall at most
``ACCURACY_DROP_MAX`` (1 point) below the reference's; a larger drop is flagged only when the
rows support it: the 95% paired bootstrap interval of (artifact - reference), row by row, lies
wholly below zero. On 64 rows one answer is 1.6 points, so a drop of one or two answers is
within the interval and is reported, not flagged. Unknown precisions get the 4-bit bar:
the loosest, so a missing record never makes an artifact look worse than it is. ``edgeft bench
--min-top1 [CLASS=]VALUE`` replaces a class's bar (or every bar); ``--max-accuracy-drop`` the
accuracy margin.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from edgeft.core.errors import ConfigError

TOP1_MIN = {"lossless": 0.995, "8-bit": 0.98, "4-bit": 0.95}
ACCURACY_DROP_MAX = 0.01  # fraction of rows: 0.01 = one percentage point
_EPS = 1e-9  # averaged agreements are sums of counts divided by counts: allow float rounding

# (kind, precision) -> class; kind None matches any kind.
_CLASS = {
    ("merged", "fp32"): "lossless", ("merged", "fp16"): "lossless", ("merged", "bf16"): "8-bit",
    ("onnx", "fp32"): "lossless", ("onnx", "fp16"): "8-bit", ("onnx", "int8"): "8-bit", ("onnx", "int4"): "4-bit",
    ("gguf", "f32"): "lossless", ("gguf", "f16"): "lossless", ("gguf", "bf16"): "8-bit",
    ("gguf", "q8_0"): "8-bit", ("gguf", "q6_k"): "8-bit",
    # Phone formats: GenAI and ORT-format carry the ONNX variants' graphs; ExecuTorch 8da8w is 8-bit,
    # 8da4w falls to 4-bit.
    **{(kind, p): c for kind in ("onnx-genai", "ort")
       for p, c in (("fp32", "lossless"), ("fp16", "8-bit"), ("int8", "8-bit"), ("int4", "4-bit"))},
    ("executorch", "fp32"): "lossless", ("executorch", "8da8w"): "8-bit",
}


def precision_class(kind: str, precision: str) -> str:
    return _CLASS.get((kind, precision.lower()), "4-bit")


def parse_top1_overrides(values: Sequence[str], flag: str = "--min-top1") -> dict[str, float]:
    """``["0.99", "4-bit=0.9"]`` -> ``{"all": 0.99, "4-bit": 0.9}``; a class bar beats "all"."""
    out: dict[str, float] = {}
    for value in values:
        cls, _, number = value.rpartition("=")
        cls = cls.strip() or "all"
        if cls != "all" and cls not in TOP1_MIN:
            raise ConfigError(f"{flag} {value}: unknown class {cls!r}; use {', '.join(TOP1_MIN)} (or no class for all)")
        try:
            out[cls] = float(number)
        except ValueError:
            raise ConfigError(f"{flag} {value}: {number!r} is not a number") from None
    return out


def top1_bar(kind: str, precision: str, overrides: Mapping[str, float] | None = None) -> float:
    """Minimum top-1 agreement for an artifact; ``overrides`` (by class, or "all") replace the defaults."""
    cls = precision_class(kind, precision)
    overrides = overrides or {}
    return overrides.get(cls, overrides.get("all", TOP1_MIN[cls]))


def flags_for(entry: dict[str, Any], reference_accuracy: float | None, *,
              top1_overrides: Mapping[str, float] | None = None, max_accuracy_drop: float = ACCURACY_DROP_MAX,
              accuracy_diff: Mapping[str, float] | None = None) -> list[str]:
    """Reasons ``entry`` (a report entry) falls below its bars; empty when it meets them all.

    ``accuracy_diff`` is ``paired_difference_interval`` of the artifact against the reference; with
    it, an accuracy drop is flagged only when the interval's upper end is below zero.
    """
    reasons = []
    bar = top1_bar(entry["kind"], entry["precision"], top1_overrides)
    top1 = entry.get("top1_agreement")
    if top1 is None or not top1 >= bar - _EPS:  # NaN fails too
        reasons.append(f"top-1 {_fmt(top1)} < {bar:g}")
    acc = entry.get("task_accuracy")
    if reference_accuracy is not None:
        floor = reference_accuracy - max_accuracy_drop
        supported = accuracy_diff is None or accuracy_diff["high"] < 0
        if acc is None or (not acc >= floor - _EPS and supported):
            ci = (f" (95% interval of the difference {accuracy_diff['low']:+.3f}..{accuracy_diff['high']:+.3f})"
                  if accuracy_diff else "")
            reasons.append(f"task accuracy {_fmt(acc)} < reference {reference_accuracy:.3f} - {max_accuracy_drop:g}{ci}")
    return reasons


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``hits / n``."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference_interval(hits: Sequence[bool], ref_hits: Sequence[bool], *, resamples: int = 2000,
                               seed: int = 0) -> dict[str, float]:
    """Accuracy difference (artifact - reference) over the same rows and its 95% paired bootstrap interval."""
    import numpy as np

    a = np.asarray(hits, dtype=float) - np.asarray(ref_hits, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    means = a[idx].mean(axis=1)
    return {"difference": float(a.mean()), "low": float(np.quantile(means, 0.025)),
            "high": float(np.quantile(means, 0.975)), "rows": int(len(a))}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
