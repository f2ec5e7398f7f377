"""Progress bars (rich) that show rate and ETA; quiet when output is not a terminal."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)


def step_progress(description: str, *extra_fields: str) -> Progress:
    """A bar for a loop of known length: ``n/N``, elapsed, ETA and any named extra fields."""
    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        *[TextColumn(f"{{task.fields[{name}]}}") for name in extra_fields],
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    return Progress(*cols, console=console, disable=not sys.stderr.isatty(), transient=False)


def say(message: str) -> None:
    """A status line on stderr (stdout is kept for results)."""
    console.print(message, highlight=False)
