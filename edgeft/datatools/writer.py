"""Output of ``edgeft data``: JSON Lines files written under a temporary name and renamed only when
complete, so an interrupted run never leaves a half file under the final name.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from edgeft.core.fsutil import atomic_file


class JsonlWriter:
    """Appends records as JSON lines to an open file; counts them."""

    def __init__(self, handle: Any):
        self._handle = handle
        self.rows = 0

    def write(self, record: Any) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.rows += 1


@contextlib.contextmanager
def jsonl_output(path: Path) -> Iterator[JsonlWriter]:
    """A writer for ``path``: renamed into place when the block ends without an error."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        yield JsonlWriter(fh)


@contextlib.contextmanager
def jsonl_outputs(paths: dict[str, Path]) -> Iterator[dict[str, JsonlWriter]]:
    """One writer per name (e.g. the splits), all renamed into place together at the end."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(jsonl_output(path)) for name, path in paths.items()}
