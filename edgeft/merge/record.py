"""The merge's verification record: the checks, the figures behind them and the provenance,
written to ``OUTPUT/edgeft-verify.json``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from edgeft.core.records import Record
from edgeft.merge.plan import MergePlan
from edgeft.merge.verify import Figures, agreement_checks


def merge_record(plan: MergePlan, figures: Figures, bad: list[str], details: dict[str, Any]) -> Record:
    """The verdict: checks against the bars in ``verify``, figures and provenance as metrics.

    ``bad`` names the non-finite tensors (none for a merge that was written); ``details`` (prompt
    counts, quantized layers, sizes) is added to the metrics as it is.
    """
    if plan.quant is None:
        reference = "fp32 base + adapter, unmerged"
    else:
        reference = f"4-bit {plan.quant.quant_type} base (bitsandbytes) + adapter, unmerged"
    metrics: dict[str, Any] = {
        "policy": plan.policy,
        "requested_policy": plan.requested_policy,
        "dtype": plan.dtype,
        "base": plan.base,
        "method": plan.method,
        "quantization": asdict(plan.quant) if plan.quant else None,
        "quantization_assumed": bool(plan.quant and plan.quant.assumed),
        "as_trained_reference": reference,
        "compare_compute_dtype": "float32",
        "policies": figures.policies,
        "quantization_gap": figures.gap,
        "merge_vs_unmerged_same_weights": figures.merge,
        **details,
    }
    if plan.quant is not None and plan.quant.assumed:
        metrics["assumption"] = (
            "no edgeft-run.json: the adapter is assumed to have been trained on an NF4, double-quant, "
            "fp32-compute 4-bit base"
        )
    if bad:
        metrics["nonfinite_tensors"] = bad[:20]
    checks = agreement_checks(plan, figures, bad)
    return Record(artifact=str(plan.output), kind="merged", reference=str(plan.adapter), checks=checks, metrics=metrics)
