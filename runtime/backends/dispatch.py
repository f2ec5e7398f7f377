"""From an artifact kind to its engine: import the engine's libraries (``import_engine``) or load the
artifact with its back-end (``open_backend``)."""

from __future__ import annotations

from pathlib import Path

from edgeft.core.errors import EdgeftError
from runtime.artifacts import EXECUTORCH, GENAI, GGUF, MERGED, ONNX, ORT, UNMERGED
from runtime.backends.base import Backend
from runtime.backends.executorch_backend import ExecutorchBackend, import_executorch_runtime
from runtime.backends.genai_backend import GenaiBackend, import_genai
from runtime.backends.llama_backend import GgufBackend, import_llama_cpp
from runtime.backends.onnx_backend import OnnxBackend, OrtFormatBackend
from runtime.backends.torch_backend import TorchBackend


def import_engine(kind: str) -> None:
    """Import the libraries ``kind`` runs on, so that load time can be measured apart from imports."""
    if kind in (UNMERGED, MERGED):
        import torch  # noqa: F401
        import transformers  # noqa: F401

        if kind == UNMERGED:
            import peft  # noqa: F401
    elif kind in (ONNX, ORT):
        import onnxruntime  # noqa: F401
    elif kind == GGUF:
        import_llama_cpp()
    elif kind == GENAI:
        import_genai()
    elif kind == EXECUTORCH:
        import_executorch_runtime()


def open_backend(kind: str, path: str | Path, *, threads: int, max_tokens: int) -> Backend:
    """Load ``path`` with the back-end for ``kind``; ``max_tokens`` bounds prompt + generated tokens."""
    path = Path(path)
    if kind in (UNMERGED, MERGED):
        return TorchBackend(path, kind=kind, threads=threads)
    if kind == ONNX:
        return OnnxBackend(path, threads=threads)
    if kind == ORT:
        return OrtFormatBackend(path, threads=threads)
    if kind == GGUF:
        return GgufBackend(path, threads=threads, n_ctx=max_tokens)
    if kind == GENAI:
        return GenaiBackend(path, threads=threads, max_tokens=max_tokens)
    if kind == EXECUTORCH:
        return ExecutorchBackend(path, threads=threads)
    raise EdgeftError(f"{path}: unknown artifact kind {kind!r}")
