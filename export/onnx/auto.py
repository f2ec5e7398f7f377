"""``edgeft export onnx --quantize auto``: the smallest ONNX variant that keeps the task accuracy the user can afford.

Candidates (``CANDIDATES``: int4 and int8, int8 also with the outlier smoothing and GPTQ when calibration
rows are given; with calibration rows each also takes GPTQ where its table row, ``quantize.GPTQ_VARIANTS``,
says so) are exported and verified one by one on the user's evaluation rows (up to ``AUTO_MAX_ROWS``); the
smallest that passes its verification and whose rows show its task accuracy within ``--max-accuracy-drop``
points of the merged model's (upper end of the drop's 95% paired interval) is kept under the output name,
with the frontier (size against task accuracy and KL of every candidate) in its record and as ``frontier.png``
inside the folder. When no quantized candidate is shown within the budget, fp16 is written (lossless on these
models) and the record says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgeft.core.progress import say
from edgeft.core.records import Record, read_record, write_record
from export.evalrows import AUTO_MAX_ROWS
from export.frontier import (check_auto_inputs, choose, frontier_point, nothing_fits, plot_frontier, record_checks,
                             work_dir)
from export.onnx.plan import check_output

# (variant, calibrated), any order: the frontier is sorted by the size each candidate comes out at.
# calibrated: the outlier smoothing and GPTQ on the calibration rows (skipped without them); otherwise the
# variant's table rows decide (int4 takes GPTQ whenever calibration rows are given). int4 with up_proj at
# 8 bits too (--eight-bit up_proj) is not a candidate: on the SmolLM2 SST-2 fine-tune it still failed its
# verification (top-1 0.8917, 0.8942 with --activation-bits 16; benchmarks/QUANTIZATION.md), so there it
# would only add an export auto cannot keep; it is the user's to try.
CANDIDATES: tuple[tuple[str, bool], ...] = (("int4", False), ("int8", False), ("int8", True))
CALIBRATED_SUFFIX = "-smoothed-gptq"
FALLBACK = "fp16"
FRONTIER_PNG = "frontier.png"


def export_onnx_auto(model_dir: Path, output: Path, *, max_accuracy_drop: float, eval_data: Path | None,
                     calibration: Path | None = None, overwrite: bool = False,
                     candidates: tuple[tuple[str, bool], ...] = CANDIDATES, activation_bits: int = 8) -> Record:
    """Search ``candidates`` (see the module docstring); returns the kept folder's record.
    ``activation_bits``: every candidate's (``export_onnx``)."""
    from export.onnx import export_onnx

    check_auto_inputs(max_accuracy_drop, eval_data, "--quantize")
    output = Path(output)
    check_output(output, overwrite)
    work = work_dir(output)
    frontier: list[dict[str, Any]] = []
    try:
        for variant, calibrated in candidates:
            if calibrated and calibration is None:
                continue
            name = variant + (CALIBRATED_SUFFIX if calibrated else "")
            say(f"--quantize auto: trying {name}")
            # the calibration rows go to every candidate: GPTQ where the variant's table row takes it
            rec = export_onnx(model_dir, work / name, quantize=variant, eval_data=eval_data,
                              calibration=calibration, smooth=calibrated, gptq=True if calibrated else None,
                              max_eval_rows=AUTO_MAX_ROWS, activation_bits=activation_bits)
            quantizer = rec.metrics.get("quantizer") or {}
            frontier.append(frontier_point(name, rec, rec.metrics["size_bytes"], max_accuracy_drop, variant=variant,
                                           smoothed="skipped" not in quantizer.get("smoothing", {"skipped": True}),
                                           gptq="gptq" in quantizer))
        frontier.sort(key=lambda p: p["size_bytes"])
        best = choose(frontier)
        if best is None:
            say(f"--quantize auto: {nothing_fits(frontier, max_accuracy_drop, FALLBACK)}")
            export_onnx(model_dir, work / FALLBACK, quantize=FALLBACK, eval_data=eval_data, max_eval_rows=AUTO_MAX_ROWS)
        chosen = work / (best["candidate"] if best else FALLBACK)
        return _keep(chosen, output, frontier, max_accuracy_drop)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _keep(chosen: Path, output: Path, frontier: list[dict[str, Any]], budget: float) -> Record:
    """Record the frontier in the chosen folder, then rename it to the output name (an existing output is
    moved aside first and removed only once the new one is in place)."""
    old = read_record(chosen)
    plot_frontier(frontier, chosen / FRONTIER_PNG, budget, size_label="model size (MiB)")
    metrics = {**old["metrics"], "auto": {"max_accuracy_drop_points": budget, "chosen": chosen.name,
                                          "frontier": frontier, "frontier_png": str(output / FRONTIER_PNG)}}
    record = Record(artifact=str(output), kind=old["kind"], reference=old["reference"],
                    checks=record_checks(old), metrics=metrics)
    write_record(chosen, record)  # bound to the same files by name; the folder moves whole
    output.parent.mkdir(parents=True, exist_ok=True)
    previous = output.with_name(f".{output.name}.previous")
    if output.exists():
        shutil.rmtree(previous, ignore_errors=True)
        output.rename(previous)
    chosen.rename(output)
    shutil.rmtree(previous, ignore_errors=True)
    size = metrics["size_bytes"] / 2**20
    say(f"--quantize auto: kept {chosen.name} ({size:.1f} MiB)" + (f" within {budget:g} point(s)"
                                                                  if chosen.name != FALLBACK else ""))
    return record
