"""The report every ``edgeft data`` command writes: counts, the reason of every row removed, changed
or skipped (with a few examples per reason), and command-specific figures, as JSON and Markdown.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft import __version__
from edgeft.core.fsutil import atomic_file, write_json

EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 200  # examples are cut to this many characters


@dataclass
class DataReport:
    """What one command did: ``counts`` (rows read, written, ...), ``reasons`` (why rows were
    dropped, changed or skipped) with ``examples`` for each, and free-form ``figures``."""

    command: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def note(self, reason: str, example: str) -> None:
        """Count one row under ``reason``; keep the first few examples."""
        self.reasons[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_PER_REASON:
            kept.append(example if len(example) <= EXAMPLE_CHARS else example[:EXAMPLE_CHARS] + "…")

    def skip(self, reason: str, message: str) -> None:
        """A row skipped by ``--skip-bad-rows``: counted and reported (``on_bad`` of ``read_records``)."""
        self.counts["skipped_bad"] += 1
        self.note(f"skipped: {reason}", message)

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": f"edgeft data {self.command}", "source": self.source, "outputs": self.outputs,
            "options": self.options, "counts": dict(self.counts), "reasons": dict(self.reasons.most_common()),
            "examples": self.examples, "figures": self.figures, "edgeft_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def markdown(self) -> str:
        lines = [f"# edgeft data {self.command}: {self.source}", ""]
        if self.outputs:
            lines += ["Outputs: " + ", ".join(f"`{o}`" for o in self.outputs), ""]
        lines += ["| count | rows |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in self.counts.items()] + [""]
        if self.reasons:
            lines += ["## Reasons", "", "| reason | rows | examples |", "|---|---|---|"]
            for reason, n in self.reasons.most_common():
                shown = "<br>".join(_cell(x) for x in self.examples.get(reason, []))
                lines.append(f"| {reason} | {n:,} | {shown} |")
            lines.append("")
        if self.figures:
            lines += ["## Figures", "", "```json", json.dumps(self.figures, indent=2, ensure_ascii=False, default=str),
                      "```", ""]
        return "\n".join(lines)

    def write(self, prefix: Path) -> tuple[Path, Path]:
        """``PREFIX.json`` and ``PREFIX.md``, each written atomically; returns both paths."""
        json_path, md_path = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
        write_json(json_path, self.to_dict())
        with atomic_file(md_path) as tmp:
            tmp.write_text(self.markdown(), encoding="utf-8")
        return json_path, md_path


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\x1f", " ␟ ")


def report_prefix(output: Path) -> Path:
    """Where a file output's report goes: ``out.jsonl`` -> ``out.report`` (+ .json / .md)."""
    return output.with_name(output.stem + ".report")
