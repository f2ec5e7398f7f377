"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(metrics: list[dict[str, Any]], out: Path) -> Path:
    """Training loss, eval loss and learning rate against optimizer step."""
    plt = _pyplot()
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    if train:
        ax1.plot([m["step"] for m in train], [m["loss"] for m in train], label="train loss", lw=1)
    if evals:
        ax1.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval loss")
    ax1.set_ylabel("loss (response tokens)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    if train:
        ax2.plot([m["step"] for m in train], [m["lr"] for m in train], color="tab:green", lw=1)
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    return save_png(fig, out)


def save_png(fig: Any, out: Path) -> Path:
    """Lay out ``fig``, write it to ``out`` atomically as a PNG, and close it."""
    from edgeft.core.fsutil import atomic_file

    plt = _pyplot()
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
