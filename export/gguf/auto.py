"""``edgeft export gguf --type auto``: the smallest GGUF that keeps the task accuracy the user can afford.

Candidates (types × importance matrix on/off, each with the type's higher-precision tensors) are
exported and verified one by one on the user's evaluation rows (up to ``AUTO_MAX_ROWS`` of them); the
smallest that passes its verification and whose rows show its task accuracy within
``--max-accuracy-drop`` points of the merged model's (the upper end of the drop's 95% paired interval,
``export.frontier.frontier_point``) is kept under the output name, with the frontier (size against task
accuracy and KL of every candidate tried) in its record and as a PNG beside it. When no quantized
candidate is shown within the budget, f16 is written: nothing smaller is good enough, and it says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgeft.core.errors import ConfigError
from edgeft.core.progress import say
from edgeft.core.records import Record, record_path, write_record
from export.evalrows import AUTO_MAX_ROWS
from export.frontier import (FRONTIER_SUFFIX, check_auto_inputs, choose, frontier_point, nothing_fits, plot_frontier,
                             record_checks, work_dir)
from export.gguf.gptq import GPTQ_TYPE
from export.gguf.tables import QUANT_TYPES, QuantOptions

# (type, calibrated), smallest first (bits per weight as llama.cpp's mixes come out on small models).
# Calibrated: on the --calibration rows, as the type's table row says (an importance matrix for the
# k-quants, the smoothing where measured to help), and for q8_0 also GPTQ onto its grid (opt-in on
# its own: a gain within the noise on the full SST-2 dev set, so the user's rows decide here).
CANDIDATES: tuple[tuple[str, bool], ...] = (
    ("q4_k_m", True), ("q4_k_m", False), ("q5_k_m", True), ("q5_k_m", False),
    ("q6_k", True), ("q6_k", False), ("q8_0", True), ("q8_0", False),
)
FALLBACK = "f16"


def export_gguf_auto(model_dir: Path, output: Path, *, max_accuracy_drop: float, eval_data: Path | None,
                     calibration: Path | None, overwrite: bool = False,
                     candidates: tuple[tuple[str, bool], ...] = CANDIDATES) -> Record:
    """Search ``CANDIDATES`` (see the module docstring); returns the kept file's record."""
    from export.gguf import export_gguf

    check_auto_inputs(max_accuracy_drop, eval_data, "--type")
    output = Path(output)
    if output.exists() and not overwrite:
        raise ConfigError(f"--output {output} already exists; pass --overwrite to replace it")
    work = work_dir(output)
    frontier: list[dict[str, Any]] = []
    try:
        for qtype, calibrated in candidates:
            if calibrated and calibration is None:
                continue
            path = work / f"{qtype}{_suffix(qtype) if calibrated else ''}.gguf"
            say(f"--type auto: trying {path.stem}")
            rec = export_gguf(model_dir, path, qtype=qtype, calibration=calibration if calibrated else None,
                              eval_data=eval_data, max_eval_rows=AUTO_MAX_ROWS,
                              quant_options=QuantOptions(gptq=True if calibrated and qtype == GPTQ_TYPE else None))
            frontier.append(frontier_point(path.stem, rec, rec.metrics["file_size_bytes"], max_accuracy_drop,
                                           type=qtype, calibrated=calibrated))
        frontier.sort(key=lambda p: p["size_bytes"])
        best = choose(frontier)
        chosen = work / f"{best['candidate']}.gguf" if best else None
        if chosen is None:
            say(f"--type auto: {nothing_fits(frontier, max_accuracy_drop, FALLBACK)}")
            chosen = work / f"{FALLBACK}.gguf"
            export_gguf(model_dir, chosen, qtype=FALLBACK, eval_data=eval_data, max_eval_rows=AUTO_MAX_ROWS)
        return _keep(chosen, output, frontier, max_accuracy_drop)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _suffix(qtype: str) -> str:
    """A calibrated candidate's name: what calibration does for its type."""
    spec = QUANT_TYPES[qtype]
    return "-imatrix" if spec.imatrix else "-gptq" if qtype == GPTQ_TYPE else "-calibrated"


def _keep(chosen: Path, output: Path, frontier: list[dict[str, Any]], budget: float) -> Record:
    """Move the chosen file and its Modelfile under the output name; its record gains the frontier."""
    from edgeft.core.fsutil import atomic_file
    from edgeft.core.records import read_record
    from export.gguf.modelfile import MODELFILE_SUFFIX

    rec_dict = read_record(chosen)
    output.parent.mkdir(parents=True, exist_ok=True)
    for old in (output, record_path(output)):
        Path(old).unlink(missing_ok=True)
    shutil.move(str(chosen), str(output))
    modelfile = chosen.with_name(chosen.stem + MODELFILE_SUFFIX).read_text()
    with atomic_file(output.with_name(output.stem + MODELFILE_SUFFIX)) as tmp:
        tmp.write_text(modelfile.replace(f"FROM ./{chosen.name}", f"FROM ./{output.name}"))
    plot = output.with_name(output.stem + FRONTIER_SUFFIX)
    plot_frontier(frontier, plot, budget)
    metrics = {**rec_dict["metrics"], "auto": {"max_accuracy_drop_points": budget, "chosen": chosen.stem,
                                               "frontier": frontier, "frontier_png": str(plot)}}
    record = Record(artifact=str(output), kind="gguf", reference=rec_dict["reference"],
                    checks=record_checks(rec_dict), metrics=metrics)
    write_record(output, record)
    say(f"--type auto: kept {chosen.stem} ({output.stat().st_size / 2**20:.1f} MiB) within {budget:g} point(s)")
    return record
