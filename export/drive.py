"""Run a ``runtime.backends`` back-end through the driver interface ``export.onnx.verify.graph_figures``
measures with (whole sequences, cached steps), so the phone formats are checked exactly as ONNX is."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from runtime.backends.base import Backend


class BackendLM:
    """``logits`` and ``cached_steps`` over a back-end that runs one sequence at a time (no padding)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def logits(self, seqs: Sequence[Sequence[int]], pad_id: int) -> list[np.ndarray]:
        """Teacher-forced logits of each sequence, (T_i, V) each; ``pad_id`` is unused (no batch)."""
        return [self.backend.logits(s) for s in seqs]

    def cached_steps(self, prompt: Sequence[int], forced: Sequence[int]) -> np.ndarray:
        """Prefill ``prompt``, then feed ``forced`` one token at a time: (len(forced), V)."""
        self.backend.reset()
        rows = [self.backend.prefill(prompt)]
        rows += [self.backend.step(t) for t in forced[:-1]]
        return np.stack(rows)
