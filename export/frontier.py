"""The accuracy-budget search shared by ``--type auto`` (GGUF) and ``--quantize auto`` (ONNX): one frontier
point per verified candidate, the choice of the smallest one within the budget, and the frontier plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeft.core.errors import ConfigError
from edgeft.core.records import Check, Record

FRONTIER_SUFFIX = ".frontier.png"


def check_auto_inputs(max_accuracy_drop: float, eval_data: Path | None, flag: str) -> None:
    """The budget and the evaluation rows an auto search needs (one-line errors naming the flag)."""
    if not 0 <= max_accuracy_drop <= 100:
        raise ConfigError(f"--max-accuracy-drop {max_accuracy_drop}: must be between 0 and 100 (points)")
    if eval_data is None:
        raise ConfigError(f"{flag} auto needs --eval-data: the candidates are judged on your evaluation rows")


def work_dir(output: Path) -> Path:
    """A fresh hidden folder beside ``output`` for the candidates (the caller removes it when done)."""
    import shutil

    work = output.with_name(f".{output.name}.auto")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def frontier_point(name: str, rec: Record, size_bytes: int, budget: float, **about: Any) -> dict[str, Any]:
    """One candidate's place on the frontier from its verification record (figures on the user's rows).

    A candidate fits the budget when its verification passed and the rows *show* it: the upper end of the
    95% paired interval of its accuracy drop is within the budget. The point estimate alone is not enough:
    on 100 rows a 4-bit file that loses 2.4 points on the full set can come out 2 points ahead by luck.
    """
    rows = rec.metrics.get("eval_rows") or {}
    diff = rows.get("task_accuracy_diff") or {}
    drop = 100 * (rows.get("reference_task_accuracy", 0.0) - rows.get("task_accuracy", 0.0))
    # the drop is -(artifact - reference): its interval is the difference's, negated and swapped
    interval = [round(-100 * diff["high"], 3), round(-100 * diff["low"], 3)] if diff else [round(drop, 3)] * 2
    return {"candidate": name, **about, "size_bytes": size_bytes,
            "task_accuracy": rows.get("task_accuracy"), "reference_task_accuracy": rows.get("reference_task_accuracy"),
            "rows": rows.get("rows"), "accuracy_drop_points": round(drop, 3), "accuracy_drop_interval": interval,
            "top1_agreement": rows.get("top1_agreement"), "mean_kl": rows.get("mean_kl"),
            "answer_agreement": rows.get("answer_agreement"), "verification": rec.status,
            "within_budget": rec.status == "passed" and interval[1] <= budget + 1e-9}


def nothing_fits(frontier: list[dict[str, Any]], budget: float, fallback: str) -> str:
    """Why no candidate was kept, in one line: the worst case the rows allow for the closest one."""
    passed = [p for p in frontier if p["verification"] == "passed"]
    if not passed:
        return f"no quantized candidate passed its verification; writing {fallback}"
    best = min(passed, key=lambda p: p["accuracy_drop_interval"][1])
    lo, hi = best["accuracy_drop_interval"]
    return (f"no quantized candidate is shown within {budget:g} point(s) on {best['rows']} rows (closest: "
            f"{best['candidate']}, drop {best['accuracy_drop_points']:+.1f}, 95% interval {lo:+.1f}..{hi:+.1f}; more "
            f"evaluation rows narrow it); writing {fallback}")


def record_checks(rec: dict[str, Any]) -> list[Check]:
    """The checks of a record read back from disk, to carry into the record of the kept candidate."""
    return [Check(c["name"], c["value"], c.get("threshold"), c.get("op", ">=")) for c in rec["checks"]]


def choose(frontier: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The smallest candidate within the budget (ties: the lower KL), or None."""
    fits = [p for p in frontier if p["within_budget"]]
    return min(fits, key=lambda p: (p["size_bytes"], p["mean_kl"] or 0.0)) if fits else None


def plot_frontier(frontier: list[dict[str, Any]], path: Path, budget: float, size_label: str = "file size (MiB)") -> Path:
    """Size against task accuracy (and mean KL) of every candidate; the budget line; misses marked x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeft.core.fsutil import atomic_file

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for p in frontier:
        size = p["size_bytes"] / 2**20
        marker = "o" if p["within_budget"] else "x"
        acc = 100 * (p["task_accuracy"] or 0)
        lo, hi = p.get("accuracy_drop_interval") or [0, 0]
        drop = p.get("accuracy_drop_points") or 0  # error bar: the 95% interval of the accuracy, from the drop's
        a1.errorbar([size], [acc], yerr=[[max(hi - drop, 0)], [max(drop - lo, 0)]], fmt=marker, capsize=3)
        a1.annotate(p["candidate"], (size, acc), fontsize=7)
        a2.scatter([size], [p["mean_kl"] or 0], marker=marker)
        a2.annotate(p["candidate"], (size, p["mean_kl"] or 0), fontsize=7)
    ref = next((p["reference_task_accuracy"] for p in frontier if p["reference_task_accuracy"] is not None), None)
    if ref is not None:
        a1.axhline(100 * ref, color="grey", lw=0.8, label="merged model")
        a1.axhline(100 * ref - budget, color="red", lw=0.8, ls="--", label=f"budget (-{budget:g} pt)")
        a1.legend(fontsize=7)
    a1.set(xlabel=size_label, ylabel="task accuracy (%)", title="accuracy on your evaluation rows")
    a2.set(xlabel=size_label, ylabel="mean KL vs merged (nats)", title="distribution agreement", yscale="log")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
