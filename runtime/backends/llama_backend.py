"""llama.cpp back-end through llama-cpp-python's low-level API (one batch, logits requested per position),
plus the one place that imports llama_cpp (``import_llama_cpp``) and llama.cpp's own tokenizer (``gguf_tokenize``).
"""

from __future__ import annotations

import contextlib
import ctypes
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

    ``tokens`` lists the ids whose keys and values the context holds, in position order, so that
    ``prefill_reusing`` evaluates a new prompt from its first token that differs; applying another
    task adapter empties it (the cached keys and values were computed with other weights).
    """

    kind = GGUF

    def __init__(self, path: Path, *, threads: int, n_ctx: int, shared: "GgufBackend | None" = None) -> None:
        """Load ``path`` (or, with ``shared``, reuse its loaded model and task adapters) and open a context."""
        self.lib = lib = import_llama_cpp()
        self.path = path
        self.n_ctx = max(64, int(n_ctx))
        self.threads = max(1, threads)
        self.model = self.ctx = self.batch = None
        self.owns_model = shared is None
        if shared is not None:
            self.model, self.adapters = shared.model, shared.adapters
        else:
            lib.llama_backend_init()
            mparams = lib.llama_model_default_params()
            mparams.n_gpu_layers = 0
            self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
            if not self.model:
                raise EdgeftError(f"{path}: llama.cpp cannot load this GGUF file")
            self.adapters: dict[str, Any] = {}  # name -> llama_adapter_lora, shared by every clone
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = self.n_ctx  # a whole sequence in one llama_decode call
        cparams.n_ubatch = min(self.n_ctx, 512)
        cparams.n_threads = cparams.n_threads_batch = self.threads
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self.close()
            raise EdgeftError(f"{path}: llama.cpp cannot create a context of {self.n_ctx} tokens")
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model)))
        self.batch = lib.llama_batch_init(self.n_ctx, 0, 1)
        self.tokens: list[int] = []
        self.applied: str | None = None  # the task adapter this context decodes with

    def clone(self) -> "GgufBackend":
        """A second context on the same model (weights and task adapters loaded once)."""
        return GgufBackend(self.path, threads=self.threads, n_ctx=self.n_ctx, shared=self)

    def load_adapter(self, name: str, path: Path) -> None:
        """Load a LoRA adapter in llama.cpp's GGUF adapter format onto the model, under ``name``."""
        handle = self.lib.llama_adapter_lora_init(self.model, str(path).encode())
        if not handle:
            raise EdgeftError(f"{path}: llama.cpp cannot load this LoRA adapter onto {self.path.name}")
        self.adapters[name] = handle

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def use_adapter(self, name: str | None) -> None:
        """Apply the named adapter (scale 1) to this context, or none; the base weights stay loaded.
        A change of adapter empties the cache, whose keys and values the previous weights computed."""
        if name == self.applied:
            return
        lib = self.lib
        if name is None:
            rc = lib.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            rc = lib.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        if rc != 0:
            raise EdgeftError(f"{self.path}: llama.cpp cannot apply adapter {name!r} (return code {rc})")
        self.applied = name
        self.reset()

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
            self.reset()  # what the failed call left in the memory no longer matches ``tokens``
            raise EdgeftError(f"{self.path}: llama_decode failed (return code {rc})")
        self.tokens += [int(t) for t in ids]
        rows = range(n) if all_logits else (n - 1,)
        out = np.empty((len(rows), self.n_vocab), np.float32)
        for j, i in enumerate(rows):
            ptr = self.lib.llama_get_logits_ith(self.ctx, i)
            out[j] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return out

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self.tokens = []

    def prefill_reusing(self, ids: Sequence[int]) -> tuple[np.ndarray, int]:
        """Keep the cached positions that hold a prefix of ``ids`` (all but the last id at most, whose
        logits are needed), drop the rest from llama.cpp's memory, and evaluate the remainder."""
        keep = common_prefix_length(self.tokens, ids, limit=len(ids) - 1)
        if keep < len(self.tokens):
            if keep > 0 and self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), 0, keep, -1):
                del self.tokens[keep:]
            else:  # nothing to keep, or a memory (recurrent, sliding window) that cannot drop a tail
                keep = 0
                self.reset()
        return self.prefill(ids[keep:]), keep

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
        if self.model and self.owns_model:
            lib.llama_model_free(self.model)  # frees its adapters too
        self.model = None


def common_prefix_length(cached: Sequence[int], ids: Sequence[int], *, limit: int) -> int:
    """How many leading ids ``cached`` and ``ids`` share, at most ``limit``."""
    n = min(len(cached), len(ids), max(limit, 0))
    for i in range(n):
        if cached[i] != ids[i]:
            return i
    return n


def gguf_tokenize(path: str | Path, texts: Sequence[str]) -> list[list[int]]:
    """Token ids llama.cpp's own tokenizer (from the GGUF vocabulary) gives ``texts``.

    Special tokens written in the text are parsed; no BOS/EOS is added. Loads the vocabulary
    only (``vocab_only``), not the weights.
    """
    with _vocab_only(path) as (lib, model):
        vocab = lib.llama_model_get_vocab(model)
        return [vocab_tokenize(lib, vocab, text) for text in texts]


def gguf_trained_context(path: str | Path) -> int:
    """The context length the GGUF's model was trained for (its ``*.context_length``), from a vocabulary-only load."""
    with _vocab_only(path) as (lib, model):
        arch = _meta(lib, model, "general.architecture")
        value = _meta(lib, model, f"{arch}.context_length")
        return int(value) if value.isdigit() else 0


def _meta(lib: Any, model: Any, key: str) -> str:
    """A metadata value of a loaded GGUF as text ("" when absent)."""
    buf = ctypes.create_string_buffer(256)
    n = lib.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace") if n >= 0 else ""


@contextlib.contextmanager
def _vocab_only(path: str | Path) -> Iterator[tuple[Any, Any]]:
    """(llama_cpp, a model loaded without its weights) for the block's duration."""
    lib = import_llama_cpp()
    lib.llama_backend_init()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    with _quiet_stderr():
        model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise EdgeftError(f"{path}: llama.cpp cannot read the vocabulary of this GGUF file")
    try:
        yield lib, model
    finally:
        lib.llama_model_free(model)


def vocab_tokenize(lib: Any, vocab: Any, text: str, *, add_special: bool = False) -> list[int]:
    """Token ids of one text (special tokens parsed; BOS/EOS as the vocabulary adds them only with
    ``add_special``), growing the buffer if it was too small."""
    data = text.encode("utf-8")
    cap = len(data) + 8
    buf = (lib.llama_token * cap)()
    n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_special, True)
    if n < 0:  # buffer too small: -n is the count needed
        cap = -n
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_special, True)
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
