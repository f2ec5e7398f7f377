"""llama.cpp back-end through llama-cpp-python's low-level API (one batch, logits requested per position),
plus the one place that imports llama_cpp (``import_llama_cpp``) and llama.cpp's own tokenizer (``gguf_tokenize``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgeft.core.errors import EdgeftError
from runtime.artifacts import GGUF
from runtime.backends.base import Backend
from runtime.weights import WeightBytes, gguf_weight_bytes


def import_llama_cpp() -> Any:
    """The llama_cpp module, with llama.cpp's abort backtraces off and its logger at errors only."""
    # An abort inside llama.cpp would otherwise try to attach gdb for a backtrace.
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    try:
        import llama_cpp
    except ImportError:
        raise EdgeftError("llama-cpp-python is not installed; pip install 'llama-cpp-python>=0.3.16,<0.4'") from None
    # llama.cpp logs every tensor it loads through this logger; keep errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


class GgufBackend(Backend):
    """A GGUF file through llama.cpp: one sequence, a context of ``n_ctx`` tokens, CPU only.

    The high-level ``Llama`` wrapper keeps either every position's logits (``logits_all``,
    which slows prompt processing) or none; the low-level batch asks for logits per position,
    so the timed prefill computes one row and teacher forcing computes all of them.
    """

    kind = GGUF

    def __init__(self, path: Path, *, threads: int, n_ctx: int) -> None:
        self.lib = lib = import_llama_cpp()
        self.path = path
        self.n_ctx = max(64, int(n_ctx))
        self.model = self.ctx = self.batch = None
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise EdgeftError(f"{path}: llama.cpp cannot load this GGUF file")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = self.n_ctx  # a whole sequence in one llama_decode call
        cparams.n_ubatch = min(self.n_ctx, 512)
        cparams.n_threads = cparams.n_threads_batch = max(1, threads)
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self.close()
            raise EdgeftError(f"{path}: llama.cpp cannot create a context of {self.n_ctx} tokens")
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model)))
        self.batch = lib.llama_batch_init(self.n_ctx, 0, 1)
        self.n_past = 0

    def _decode(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        n = len(ids)
        if self.n_past + n > self.n_ctx:
            raise EdgeftError(f"{self.path}: sequence of {self.n_past + n} tokens exceeds the context ({self.n_ctx})")
        b = self.batch
        b.n_tokens = n
        for i, token in enumerate(ids):
            b.token[i] = int(token)
            b.pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == n - 1
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise EdgeftError(f"{self.path}: llama_decode failed (return code {rc})")
        self.n_past += n
        rows = range(n) if all_logits else (n - 1,)
        out = np.empty((len(rows), self.n_vocab), np.float32)
        for j, i in enumerate(rows):
            ptr = self.lib.llama_get_logits_ith(self.ctx, i)
            out[j] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        return self._decode(ids, all_logits=False)[-1]

    def step(self, token: int) -> np.ndarray:
        return self._decode([token], all_logits=False)[-1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self.reset()
        out = self._decode(ids, all_logits=True)
        self.reset()
        return out

    def weight_bytes(self) -> WeightBytes:
        return gguf_weight_bytes(self.path)[0]

    def close(self) -> None:
        lib = self.lib
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None


def gguf_tokenize(path: str | Path, texts: Sequence[str]) -> list[list[int]]:
    """Token ids llama.cpp's own tokenizer (from the GGUF vocabulary) gives ``texts``.

    Special tokens written in the text are parsed; no BOS/EOS is added. Loads the vocabulary
    only (``vocab_only``), not the weights.
    """
    lib = import_llama_cpp()
    lib.llama_backend_init()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    with _quiet_stderr():
        model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise EdgeftError(f"{path}: llama.cpp cannot read the vocabulary of this GGUF file")
    try:
        vocab = lib.llama_model_get_vocab(model)
        return [_tokenize_one(lib, vocab, text) for text in texts]
    finally:
        lib.llama_model_free(model)


def _tokenize_one(lib: Any, vocab: Any, text: str) -> list[int]:
    """Token ids of one text (special tokens parsed, no BOS/EOS), growing the buffer if it was too small."""
    data = text.encode("utf-8")
    cap = len(data) + 8
    buf = (lib.llama_token * cap)()
    n = lib.llama_tokenize(vocab, data, len(data), buf, cap, False, True)
    if n < 0:  # buffer too small: -n is the count needed
        cap = -n
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(vocab, data, len(data), buf, cap, False, True)
    return [int(t) for t in buf[: max(n, 0)]]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr around a call (llama.cpp prints a few load lines past its logger)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
