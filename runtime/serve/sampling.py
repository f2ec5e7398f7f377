"""Choosing the next token from logits (greedy, temperature, nucleus) and cutting text at stop strings.

Pure numpy and string logic, no model: ``pick_token`` and ``StopText``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pick_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """The next token: the argmax at temperature 0, else a draw from the tempered distribution cut to
    the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling)."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1  # tokens up to and past the mass
        kept = order[:keep]
        return int(kept[rng.choice(len(kept), p=p[kept] / p[kept].sum())])
    return int(rng.choice(len(p), p=p))


class StopText:
    """Text as it streams out, cut before the first stop string.

    Text that could still become a stop string is held back until it can be told apart, so a
    stream never shows part of a stop string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text safe to emit after ``piece``; sets ``stopped`` when a stop string completed."""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = self._held_suffix()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        """What is still held back, at the end of generation."""
        out, self.pending = self.pending, ""
        return out

    def _held_suffix(self) -> int:
        """Length of the longest end of ``pending`` that begins some stop string."""
        for n in range(min(len(self.pending), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
