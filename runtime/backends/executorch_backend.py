"""ExecuTorch back-end: a ``model.pte`` program (XNNPACK delegate, static KV cache inside the program)
run by executorch's Python runtime.

The program's ``forward`` takes ``input_ids`` int64 (1, T) and ``cache_position`` int64 (T,) and returns
logits float32 (1, T, V); the cache lives in the program's mutable buffers, and positions past the
current one are masked, so starting again at position 0 is a fresh sequence. ``T`` is 1 to the
program's ``max_seq_len`` (``edgeft-executorch.json`` beside it).

executorch's Python runtime (``executorch.runtime``) is a C++ extension linked against libtorch and
imports torch itself: unlike the ONNX and llama.cpp workers, this one has torch loaded. A phone runs
the same program with the C++ runtime, without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeft.core.errors import EdgeftError, one_line
from runtime.backends.base import AppendingBackend, Backend
from runtime.mobile import EXECUTORCH, PTE_MODEL
from runtime.weights import WeightBytes

PROGRAM_META = "edgeft-executorch.json"  # max_seq_len, vocab size, quantization (written by export.executorch)


def import_executorch_runtime() -> Any:
    """``executorch.runtime``, or a one-line error naming what to install."""
    try:
        import executorch.runtime as runtime
    except ImportError as e:
        raise EdgeftError(f"executorch is not usable here ({one_line(e)}); pip install 'edgeft[mobile]'") from None
    return runtime


def read_program_meta(directory: Path) -> dict[str, Any]:
    path = directory / PROGRAM_META
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise EdgeftError(f"{path}: missing or not JSON; export the program again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("max_seq_len"), int):
        raise EdgeftError(f"{path}: names no max_seq_len; export the program again")
    return meta


class ExecutorchBackend(AppendingBackend):
    """``model.pte`` through executorch's runtime; one sequence of at most ``max_seq_len`` tokens."""

    kind = EXECUTORCH

    def __init__(self, directory: Path, *, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.path = directory / PTE_MODEL
        meta = read_program_meta(directory)
        self.max_seq_len = int(meta["max_seq_len"])
        self.n_vocab = int(meta.get("vocab_size", 0))
        runtime = import_executorch_runtime()
        try:
            program = runtime.Runtime.get().load_program(str(self.path))
            self.method = program.load_method("forward")
        except Exception as e:  # RuntimeError / ValueError for damaged programs
            raise EdgeftError(f"{self.path}: executorch cannot load it ({one_line(e)})") from None
        self.n_past = 0

    def append(self, ids: Sequence[int]) -> np.ndarray:
        torch = self.torch
        if self.n_past + len(ids) > self.max_seq_len:
            raise EdgeftError(f"{self.path}: sequence of {self.n_past + len(ids)} tokens exceeds the program's "
                              f"max_seq_len ({self.max_seq_len})")
        positions = torch.arange(self.n_past, self.n_past + len(ids), dtype=torch.long)
        out = self.method.execute([torch.tensor([list(ids)], dtype=torch.long), positions])
        self.n_past += len(ids)
        logits = out[0][0].float().numpy()  # (T, V)
        self.n_vocab = logits.shape[-1]
        return logits

    def reset(self) -> None:
        self.n_past = 0

    def weight_bytes(self) -> WeightBytes:
        size = self.path.stat().st_size  # the program's constant segment holds the weights
        return WeightBytes(size, size, "PTE file size")

    def clone(self) -> Backend:
        raise EdgeftError(f"{self.path}: an ExecuTorch program holds one KV cache; it decodes one sequence at a time")
