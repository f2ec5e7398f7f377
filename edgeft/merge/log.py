"""What a merge shows while it runs: a timed line per stage, the final comparison table, and
library chatter silenced.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator


class MergeLog:
    """Stage lines on stderr (a spinner on a terminal) and the final comparison table."""

    def __init__(self) -> None:
        from edgeft.core.progress import console

        self.console = console

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        from edgeft.core.progress import say

        start = time.perf_counter()
        with self.console.status(f"merge: {what} ..."):
            yield
        say(f"merge: {what} ({time.perf_counter() - start:.1f} s)")

    def table(self, written_policy: str, figures: dict[str, dict[str, Any]]) -> None:
        from rich.table import Table

        if not figures:
            return
        table = Table(title="merged (fp32 compute) vs the unmerged model as trained", title_justify="left")
        for col in ("policy", "top-1 agreement", "mean KL", "max KL", "positions"):
            table.add_column(col, justify="left" if col == "policy" else "right")
        for policy, fig in figures.items():
            mark = " (written)" if policy == written_policy else ""
            table.add_row(policy + mark, f"{fig['top1_agreement']:.4f}", f"{fig['mean_kl']:.3g}",
                          f"{fig['max_kl']:.3g}", str(fig["positions"]))
        self.console.print(table)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence library chatter (advisories, deprecations, bitsandbytes' optional-kernel notice)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()  # configures transformers' root logger now, so the level set below sticks
    loggers = [logging.getLogger(n) for n in ("transformers", "peft", "bitsandbytes", "accelerate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
