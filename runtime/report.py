"""Write a bench report: report.json, report.md (a table), PNG plots, and the table on stdout.

Every file is written under a temporary name and renamed (edgeft.core.fsutil). ``table_rows`` is the
single place that turns an entry into table cells, for the markdown file and the printed table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgeft.core.fsutil import atomic_file, write_json
from runtime.taskreport import per_task_lines, task_lines, write_confusion_plots

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LATENCY_PNG = "latency.png"
ACCURACY_PNG = "accuracy_vs_size.png"
OUTPUT_FILES = (REPORT_JSON, REPORT_MD, LATENCY_PNG, ACCURACY_PNG)

# Markdown table columns; the printed table keeps SHORT_COLUMNS (a terminal is narrower).
COLUMNS = ("model", "kind", "precision", "size MiB", "load s", "TTFT ms", "prompt tok/s", "decode tok/s",
           "x ref", "token p50/p95 ms", "peak RSS MiB", "% BW limit", "task acc", "ppl", "top-1", "mean KL",
           "gen agree", "verdict")
SHORT_COLUMNS = ("model", "kind", "precision", "size MiB", "TTFT ms", "decode tok/s", "x ref", "% BW limit",
                 "peak RSS MiB", "task acc", "top-1", "mean KL", "verdict")
_KIND_COLOURS = {"unmerged": "tab:gray", "merged": "tab:blue", "onnx": "tab:orange", "gguf": "tab:green"}


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """report.json, report.md and the two plots in ``out``; returns their paths."""
    write_json(out / REPORT_JSON, _finite(report))
    with atomic_file(out / REPORT_MD) as tmp:
        tmp.write_text(markdown(report), encoding="utf-8")
    plot_latency(report, out / LATENCY_PNG)
    plot_accuracy_vs_size(report, out / ACCURACY_PNG)
    write_confusion_plots([(e["name"], e.get("task_metrics")) for e in report["entries"]], out)
    return [out / name for name in OUTPUT_FILES]


def _finite(obj: Any) -> Any:
    """NaN and infinity become null: report.json stays valid JSON for every reader."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Table


def _num(x: Any, fmt: str, scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x * scale, fmt)


def table_cells(e: dict[str, Any]) -> dict[str, str]:
    """The table cells of one report entry, by column name."""
    spread = e.get("decode_tokens_per_s_spread")
    decode = _num(e["decode_tokens_per_s"], ".1f") + (f" ±{spread / 2:.0%}" if spread is not None else "")
    verdict = "reference" if e["role"] == "reference" else ("FLAGGED" if e["flags"] else "ok")
    return {
        "model": e["name"], "kind": e["kind"], "precision": e["precision"],
        "size MiB": _num(e["size_bytes"], ".1f", 2**-20), "load s": _num(e["load_s"], ".2f"),
        "TTFT ms": _num(e["ttft_s"], ".1f", 1000), "prompt tok/s": _num(e["prompt_tokens_per_s"], ".0f"),
        "decode tok/s": decode, "x ref": _num(e["decode_speedup_vs_reference"], ".2f"),
        "token p50/p95 ms": f"{_num(e['token_latency_p50_s'], '.1f', 1000)}/{_num(e['token_latency_p95_s'], '.1f', 1000)}",
        "peak RSS MiB": _num(e["peak_rss_bytes"], ".0f", 2**-20), "% BW limit": _num(e["bandwidth_fraction"], ".0%"),
        "task acc": _num(e["task_accuracy"], ".3f"), "ppl": _num(e["perplexity"], ".3g"),
        "top-1": _num(e["top1_agreement"], ".4f"), "mean KL": _num(e["mean_kl"], ".2e"),
        "gen agree": _num(e["generation_agreement"], ".3f"), "verdict": verdict,
    }


def table_rows(report: dict[str, Any], columns: tuple[str, ...] = COLUMNS) -> list[list[str]]:
    return [[table_cells(e)[c] for c in columns] for e in report["entries"]]


def flag_lines(report: dict[str, Any]) -> list[str]:
    return [f"{e['name']}: {'; '.join(e['flags'])}" for e in report["entries"] if e["flags"]]


def markdown(report: dict[str, Any]) -> str:
    m, w = report["machine"], report["workload"]
    lat, acc = w["latency"], w["accuracy"]
    bw = m.get("bandwidth", {})
    lines = [
        "# edgeft bench",
        "",
        f"Reference: `{report['reference']}` (unmerged PyTorch when an adapter). Created {report['created']}, "
        f"edgeft {report['edgeft_version']}.",
        "",
        f"- Machine: {m.get('cpu_model')}, {m.get('physical_cores')} physical cores, {report['threads']} threads; "
        f"load average {m.get('load_average')} before, {m.get('load_average_after')} after.",
        f"- Memory read bandwidth: {bw.get('read_gbps')} GB/s (copy {bw.get('copy_gbps')} GB/s).",
        f"- Latency: batch {lat['batch']}, {lat['prompt_tokens']}-token prompt, {lat['new_tokens']} new tokens "
        f"(EOS ignored), {lat['warmup']} warm-up + {lat['repeats']} timed runs; median, ± half the min-max range.",
        f"- Accuracy: {acc['rows']} rows of `{acc['data']}`, {acc['compared_positions']} teacher-forced positions "
        f"({acc['compared_from']}); greedy answers of at most {acc['answer_tokens']} tokens.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(report)]
    t = report["thresholds"]
    bars = ", ".join(f"{k} >= {v}" for k, v in t["top1_min_by_class"].items())
    lines += [
        "",
        f"Bars: top-1 agreement by precision class ({bars}"
        + ("; overridden: " + ", ".join(f"{k} >= {v}" for k, v in t["top1_overrides"].items()) if t["top1_overrides"] else "")
        + f"); task accuracy at most {t['max_accuracy_drop']:g} below the reference's.",
        "Flagged: " + ("none." if not report["flagged"] else ""),
        *[f"- {line}" for line in flag_lines(report)],
        "",
        f"% BW limit: {report['bandwidth_note']}.",
        "",
    ]
    lines += task_lines([(e["name"], e.get("task_metrics")) for e in report["entries"]])
    lines += per_task_lines([(e["name"], e.get("task_metrics_by_task")) for e in report["entries"]])
    return "\n".join(lines)


def print_table(report: dict[str, Any]) -> None:
    """The short table on stdout (rich), flagged rows in red and their reasons below."""
    from rich.console import Console
    from rich.table import Table

    rows = table_rows(report, SHORT_COLUMNS)
    table = Table(title="edgeft bench", show_lines=False)
    for col in SHORT_COLUMNS:
        table.add_column(col, no_wrap=True)
    for entry, row in zip(report["entries"], rows):
        table.add_row(*row, style="red" if entry["flagged"] else None)
    # Wide enough for every cell on one line (a narrow terminal scrolls rather than folds numbers).
    need = sum(max(len(c), *(len(r[i]) for r in rows)) + 3 for i, c in enumerate(SHORT_COLUMNS)) + 1
    console = Console(soft_wrap=False, width=max(need, Console().width))
    console.print(table)
    for line in flag_lines(report):
        console.print(f"flagged {line}", highlight=False)


# ---------------------------------------------------------------------------------------------
# Plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_latency(report: dict[str, Any], path: Path) -> Path:
    """Decode tokens/s (min-max bars, % of the bandwidth limit on top) and time to first token."""
    plt = _pyplot()
    entries = report["entries"]
    names = [e["name"] for e in entries]
    colours = [_KIND_COLOURS.get(e["kind"], "tab:purple") for e in entries]
    x = range(len(entries))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(entries) + 4), 4.5))
    dec = [e["decode_tokens_per_s"] or 0 for e in entries]
    err = [[max(0.0, d - (e.get("decode_tokens_per_s_min") or d)) for d, e in zip(dec, entries)],
           [max(0.0, (e.get("decode_tokens_per_s_max") or d) - d) for d, e in zip(dec, entries)]]
    ax1.bar(x, dec, color=colours, yerr=err, capsize=4)
    for i, e in enumerate(entries):
        if e.get("bandwidth_fraction") is not None:
            ax1.annotate(f"{e['bandwidth_fraction']:.0%} of limit", (i, dec[i]), ha="center", va="bottom",
                         fontsize=7, xytext=(0, 6), textcoords="offset points")
    ax1.set_ylabel("decode tokens/s (median, min-max)")
    ttft = [1000 * (e["ttft_s"] or 0) for e in entries]
    ax2.bar(x, ttft, color=colours)
    ax2.set_ylabel("time to first token, ms")
    for ax in (ax1, ax2):
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    lat = report["workload"]["latency"]
    fig.suptitle(f"batch 1, {lat['prompt_tokens']}-token prompt, {lat['new_tokens']} new tokens, "
                 f"{report['threads']} threads ({report['machine'].get('cpu_model')})", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_accuracy_vs_size(report: dict[str, Any], path: Path) -> Path:
    """Top-1 agreement and task accuracy against size on disk (log scale), one point per model."""
    plt = _pyplot()
    entries = report["entries"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, key, label in ((axes[0], "top1_agreement", "top-1 agreement with the reference"),
                           (axes[1], "task_accuracy", "task accuracy (exact match)")):
        for e in entries:
            y = e.get(key)
            if y is None:
                continue
            size = max(e["size_bytes"], 1) / 2**20
            ax.scatter([size], [y], color=_KIND_COLOURS.get(e["kind"], "tab:purple"),
                       marker="*" if e["role"] == "reference" else ("x" if e["flagged"] else "o"), s=80)
            ax.annotate(e["name"], (size, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("size on disk, MiB (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("accuracy vs size (star: reference, x: flagged)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
