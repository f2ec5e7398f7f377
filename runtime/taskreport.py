"""Task metrics in reports: a Markdown table per model (with bootstrap intervals) and a confusion-matrix
PNG for label-set answers. Used by ``edgeft bench`` (report.md) and ``edgeft eval``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgeft.core.fsutil import atomic_file

_SCALARS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "exact_match", "bleu", "rouge_l")


def metric_cells(metrics: dict[str, Any]) -> list[str]:
    """``name value [low, high]`` for each scalar metric present."""
    cells = []
    for name in _SCALARS:
        if name in metrics and metrics[name] is not None:
            low, high = metrics.get("ci", {}).get(name, (None, None))
            interval = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
            cells.append(f"{name} {metrics[name]:.3f}{interval}")
    return cells


def task_lines(named_metrics: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    """Markdown: one line per model with its task metrics, then each label-set model's per-class table."""
    rows = [(name, m) for name, m in named_metrics if m and m.get("kind")]
    if not rows:
        return []
    lines = ["## Task metrics", "", f"{rows[0][1]['ci_method']}; answers compared after normalisation.", ""]
    lines += [f"- `{name}` ({m['kind']}, {m['rows']} rows): " + ", ".join(metric_cells(m)) for name, m in rows]
    for name, m in rows:
        if m["kind"] == "classification":
            lines += ["", f"`{name}` per class:", "", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
            lines += [f"| {lab} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
                      for lab, c in m["per_class"].items()]
    return lines + [""]


def per_task_lines(named_by_task: list[tuple[str, dict[str, dict[str, Any]] | None]]) -> list[str]:
    """Markdown: for each model whose rows carry a ``task``, one line per task with its metrics."""
    rows = [(name, by_task) for name, by_task in named_by_task if by_task]
    if not rows:
        return []
    lines = ["## Task metrics per task", "", "Each task's rows scored on their own, with the same intervals.", ""]
    lines += [f"- `{name}`, task `{task}` ({m['kind']}, {m['rows']} rows): " + ", ".join(metric_cells(m))
              for name, by_task in rows for task, m in by_task.items()]
    return lines + [""]


def plot_confusion(confusion: dict[str, Any], title: str, path: Path) -> Path:
    """The confusion matrix (rows: reference label, columns: predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels, matrix = confusion["labels"], np.array(confusion["matrix"])
    size = 2.5 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def confusion_file(name: str) -> str:
    """``confusion_<name>.png`` with the name made safe for a file name."""
    return f"confusion_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.png"


def write_confusion_plots(named_metrics: list[tuple[str, dict[str, Any] | None]], out: Path) -> list[Path]:
    """A confusion-matrix PNG in ``out`` for each model whose answers form a label set."""
    return [plot_confusion(m["confusion"], name, out / confusion_file(name))
            for name, m in named_metrics if m and m.get("kind") == "classification"]
