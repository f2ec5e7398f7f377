"""How the ONNX export shows itself while it runs: a spinner and a timing per stage, and library
chatter (optimum, torch, onnx, onnxruntime) kept off the terminal."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Iterator

from edgeft.core.records import Record


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence optimum/torch/onnx chatter (Python warnings, library loggers, ORT's C++ log)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import onnxruntime as ort

            ort.set_default_logger_severity(3)
            yield
        finally:
            logging.disable(previous)


class Progress:
    """A spinner per stage on stderr (rich), each stage's seconds kept in ``timings``."""

    def __init__(self) -> None:
        from edgeft.core.progress import console

        self.console = console
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, key: str, text: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with self.console.status(text):
            yield
        self.timings[f"{key}_s"] = round(time.perf_counter() - t0, 2)
        self.console.print(f"[green]✓[/] {text} ({self.timings[f'{key}_s']:.1f} s)", highlight=False)

    def finish(self) -> dict[str, float]:
        """Add the seconds since the start as ``total_s``; returns the timings."""
        self.timings["total_s"] = round(time.perf_counter() - self.start, 2)
        return self.timings

    def done(self, record: Record) -> None:
        mib = record.metrics.get("size_bytes", 0) / 2**20
        colour = "green" if record.status == "passed" else "red"
        label = {"onnx-genai": "ONNX Runtime GenAI", "ort": "ORT-format", "executorch": "ExecuTorch"}.get(record.kind, "ONNX")
        self.console.print(f"[{colour}]{record.status}[/] {record.metrics.get('variant')} {label}, {mib:.1f} MiB",
                           highlight=False)
