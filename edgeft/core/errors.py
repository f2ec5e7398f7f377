"""User-facing errors.

Every problem a user can fix (a missing file, a bad row, a wrong flag value) is raised as an
``EdgeftError``. The CLI prints its message as one line on stderr and exits non-zero; no
traceback. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations

import click


# What to do when training runs out of memory: printed by the CLI and by training itself.
OOM_HINT = (
    "out of memory; lower --batch-size or --max-seq-len (raise --grad-accum to keep the effective batch), "
    "keep --gradient-checkpointing on, or use --method qlora"
)


class EdgeftError(click.ClickException):
    """A problem the user can fix; the message names the file, line, field or flag."""

    exit_code = 1

    def show(self, file=None) -> None:  # one line, no "Error: " prefix duplication
        click.echo(f"edgeft: error: {self.format_message()}", err=True)


class DataError(EdgeftError):
    """A data file or one of its rows is unusable."""


class ConfigError(EdgeftError):
    """A configuration value (flag or YAML key) is invalid."""

    exit_code = 2


class VerificationFailed(EdgeftError):
    """An artifact was written but did not pass its verification against the reference."""

    exit_code = 3


def one_line(e: BaseException) -> str:
    """An exception from a library as one short line: its type and the first line of its message."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:400]
