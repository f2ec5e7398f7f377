"""What the quantizer and the verifier share when they call llama.cpp: a thread count and a
capture of its C-level log. The library itself is imported through ``runtime.backends``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def llama_threads() -> int:
    """Threads for llama.cpp's quantizer and evaluation: the CPUs, at most 8."""
    return max(1, min(os.cpu_count() or 1, 8))


@contextlib.contextmanager
def captured_stderr() -> Iterator[Path]:
    """Send C-level stderr (llama.cpp's per-tensor log) to a temporary file, kept for error messages."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgeft-gguf-") as tmp:
        log = Path(tmp) / "stderr.txt"
        with open(log, "w") as fh:
            saved = os.dup(2)
            os.dup2(fh.fileno(), 2)
            try:
                yield log
            finally:
                os.dup2(saved, 2)
                os.close(saved)
