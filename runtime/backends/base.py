"""The interface every back-end implements (``Backend``) and the greedy decoding loop shared by all of them.

A back-end takes token ids and returns float32 next-token logits as numpy arrays; needs numpy only.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeft.core.errors import EdgeftError
from runtime.weights import WeightBytes


class Backend:
    """Base class: a loaded model that turns token ids into next-token logits."""

    kind: str = ""
    n_vocab: int = 0

    def reset(self) -> None:
        raise NotImplementedError

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def step(self, token: int) -> np.ndarray:
        raise NotImplementedError

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def prefill_reusing(self, ids: Sequence[int]) -> tuple[np.ndarray, int]:
        """Prefill ``ids`` on this decoding state, keeping the part of it that already holds a prefix of them:
        (logits after the last id, ids not evaluated again). Back-ends without a reusable cache start over."""
        self.reset()
        return self.prefill(ids), 0

    def weight_bytes(self) -> WeightBytes:
        raise NotImplementedError

    def clone(self) -> "Backend":
        """A second decoding state (its own KV cache) on the same loaded weights, for a concurrent request.

        The weights are shared, not copied; the clone must be closed before the original.
        """
        twin = copy.copy(self)
        twin.reset()
        return twin

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a task adapter onto the loaded weights under ``name`` (llama.cpp and PyTorch back-ends)."""
        raise EdgeftError(f"{self.kind} artifacts take no task adapters (adapter {name!r})")

    def use_adapter(self, name: str | None) -> None:
        """Decode with the named task adapter from now on (None: the plain model)."""
        if name is not None:
            raise EdgeftError(f"{self.kind} artifacts take no task adapters (adapter {name!r})")

    def close(self) -> None:
        """Release native resources (llama.cpp contexts); a no-op elsewhere."""


class AppendingBackend(Backend):
    """A back-end whose engine only appends tokens to one running sequence (ExecuTorch, GenAI):
    prefill, step and whole-sequence logits are all ``append`` on a fresh or continued state."""

    def append(self, ids: Sequence[int]) -> np.ndarray:
        """Feed ``ids`` after the tokens already fed; their logits, (len(ids), V)."""
        raise NotImplementedError

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        return self.append(ids)[-1]

    def step(self, token: int) -> np.ndarray:
        return self.append([token])[-1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self.reset()
        out = self.append(ids)
        self.reset()
        return out


def greedy(backend: Backend, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation of ``prompt``: at most ``max_new_tokens``, ending at (and keeping) a stop id."""
    stop = set(stop_ids)
    backend.reset()
    logits = backend.prefill(prompt)
    out: list[int] = []
    while True:
        token = int(np.argmax(logits))
        out.append(token)
        if token in stop or len(out) >= max_new_tokens:
            return out
        logits = backend.step(token)
