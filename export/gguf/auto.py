"""``edgeft export gguf --type auto``: the smallest GGUF that keeps the task accuracy the user can afford.

Candidates (types × importance matrix on/off, each with the type's higher-precision tensors) are
exported and verified one by one on the user's evaluation rows, smallest first; the first whose
task accuracy falls by at most ``--max-accuracy-drop`` points below the merged model's (and that
passes its verification) is kept under the output name, with the frontier (size against task
accuracy and KL of every candidate tried) in its record and as a PNG beside it. When no quantized
candidate stays within the budget, f16 is written: nothing smaller is good enough, and it says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgeft.core.errors import ConfigError
from edgeft.core.progress import say
from edgeft.core.records import Record, record_path, write_record
from export.gguf.tables import QuantOptions

# Smallest first (bits per weight as llama.cpp's mixes come out on small models); imatrix variants
# only for the types that take one.
CANDIDATES: tuple[tuple[str, bool], ...] = (
    ("q4_k_m", True), ("q4_k_m", False), ("q5_k_m", True), ("q5_k_m", False),
    ("q6_k", True), ("q6_k", False), ("q8_0", False),
)
FALLBACK = "f16"
FRONTIER_SUFFIX = ".frontier.png"


def export_gguf_auto(model_dir: Path, output: Path, *, max_accuracy_drop: float, eval_data: Path | None,
                     calibration: Path | None, overwrite: bool = False,
                     candidates: tuple[tuple[str, bool], ...] = CANDIDATES) -> Record:
    """Search ``CANDIDATES`` (see the module docstring); returns the kept file's record."""
    from export.gguf import export_gguf

    if not 0 <= max_accuracy_drop <= 100:
        raise ConfigError(f"--max-accuracy-drop {max_accuracy_drop}: must be between 0 and 100 (points)")
    if eval_data is None:
        raise ConfigError("--type auto needs --eval-data: the candidates are judged on your evaluation rows")
    output = Path(output)
    if output.exists() and not overwrite:
        raise ConfigError(f"--output {output} already exists; pass --overwrite to replace it")
    work = output.with_name(f".{output.name}.auto")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    frontier: list[dict[str, Any]] = []
    try:
        for qtype, imatrix in candidates:
            if imatrix and calibration is None:
                continue
            path = work / f"{qtype}{'-imatrix' if imatrix else ''}.gguf"
            say(f"--type auto: trying {path.stem}")
            rec = export_gguf(model_dir, path, qtype=qtype, calibration=calibration if imatrix else None,
                              eval_data=eval_data, quant_options=QuantOptions(imatrix=imatrix))
            frontier.append(_point(path.stem, qtype, imatrix, rec, max_accuracy_drop))
        frontier.sort(key=lambda p: p["size_bytes"])
        best = choose(frontier)
        chosen = work / f"{best['candidate']}.gguf" if best else None
        if chosen is None:
            say(f"--type auto: no quantized type stays within {max_accuracy_drop:g} point(s); writing {FALLBACK}")
            chosen = work / f"{FALLBACK}.gguf"
            export_gguf(model_dir, chosen, qtype=FALLBACK, eval_data=eval_data)
        return _keep(chosen, output, frontier, max_accuracy_drop)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def choose(frontier: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The smallest candidate within the budget (ties: the lower KL), or None."""
    fits = [p for p in frontier if p["within_budget"]]
    return min(fits, key=lambda p: (p["size_bytes"], p["mean_kl"] or 0.0)) if fits else None


def _point(name: str, qtype: str, imatrix: bool, rec: Record, budget: float) -> dict[str, Any]:
    rows = rec.metrics.get("eval_rows") or {}
    drop = 100 * (rows.get("reference_task_accuracy", 0.0) - rows.get("task_accuracy", 0.0))
    return {"candidate": name, "type": qtype, "imatrix": imatrix, "size_bytes": rec.metrics["file_size_bytes"],
            "task_accuracy": rows.get("task_accuracy"), "reference_task_accuracy": rows.get("reference_task_accuracy"),
            "accuracy_drop_points": round(drop, 3), "top1_agreement": rows.get("top1_agreement"),
            "mean_kl": rows.get("mean_kl"), "verification": rec.status,
            "within_budget": rec.status == "passed" and drop <= budget + 1e-9}


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
                    checks=_checks(rec_dict), metrics=metrics)
    write_record(output, record)
    say(f"--type auto: kept {chosen.stem} ({output.stat().st_size / 2**20:.1f} MiB) within {budget:g} point(s)")
    return record


def _checks(rec: dict[str, Any]) -> list[Any]:
    from edgeft.core.records import Check

    return [Check(c["name"], c["value"], c.get("threshold"), c.get("op", ">=")) for c in rec["checks"]]


def plot_frontier(frontier: list[dict[str, Any]], path: Path, budget: float) -> Path:
    """Size against task accuracy (and mean KL) of every candidate; the budget line; the kept one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeft.core.fsutil import atomic_file

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for p in frontier:
        size = p["size_bytes"] / 2**20
        marker = "o" if p["within_budget"] else "x"
        a1.scatter([size], [100 * (p["task_accuracy"] or 0)], marker=marker)
        a1.annotate(p["candidate"], (size, 100 * (p["task_accuracy"] or 0)), fontsize=7)
        a2.scatter([size], [p["mean_kl"] or 0], marker=marker)
        a2.annotate(p["candidate"], (size, p["mean_kl"] or 0), fontsize=7)
    ref = next((p["reference_task_accuracy"] for p in frontier if p["reference_task_accuracy"] is not None), None)
    if ref is not None:
        a1.axhline(100 * ref, color="grey", lw=0.8, label="merged model")
        a1.axhline(100 * ref - budget, color="red", lw=0.8, ls="--", label=f"budget (-{budget:g} pt)")
        a1.legend(fontsize=7)
    a1.set(xlabel="file size (MiB)", ylabel="task accuracy (%)", title="accuracy on your evaluation rows")
    a2.set(xlabel="file size (MiB)", ylabel="mean KL vs merged (nats)", title="distribution agreement", yscale="log")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
