"""ONNX Runtime GenAI back-end: a GenAI folder (``genai_config.json`` + decoder graph) run by
``onnxruntime_genai``'s own generator, which keeps the KV cache itself, as a phone app's generator does.

onnxruntime_genai is imported inside ``GenaiBackend`` only; this module never imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeft.core.errors import EdgeftError, one_line
from runtime.backends.base import AppendingBackend
from runtime.mobile import GENAI, genai_model_files
from runtime.weights import WeightBytes, onnx_weight_bytes


def import_genai() -> Any:
    """The onnxruntime_genai module, or a one-line error naming the package to install."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise EdgeftError("onnxruntime-genai is not installed; pip install 'edgeft[mobile]'") from None
    return onnxruntime_genai


def load_genai_model(directory: Path, *, threads: int) -> Any:
    """``og.Model`` of ``directory`` on the CPU provider with ``threads`` intra-op threads."""
    og = import_genai()
    try:
        config = og.Config(str(directory))
        config.clear_providers()  # CPU
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": max(1, threads), "inter_op_num_threads": 1}}}}))
        return og.Model(config)
    except Exception as e:  # og raises RuntimeError for configs and graphs it cannot load
        raise EdgeftError(f"{directory}: onnxruntime-genai cannot load it ({one_line(e)})") from None


class GenaiBackend(AppendingBackend):
    """A GenAI folder through ``og.Generator``: tokens appended, logits read back; ``max_tokens`` bounds a sequence."""

    kind = GENAI

    def __init__(self, directory: Path, *, threads: int, max_tokens: int) -> None:
        self.og = import_genai()
        self.directory = directory
        self.model = load_genai_model(directory, threads=threads)
        self.max_length = max(64, int(max_tokens))
        self.generator: Any = None
        self.n_vocab = int(json.loads((directory / "genai_config.json").read_text())["model"].get("vocab_size", 0))

    def _fresh(self) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def append(self, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` to the sequence; their logits (T, V) float32."""
        if self.generator is None:
            self.reset()
        if self.generator.token_count() + len(ids) > self.max_length:
            raise EdgeftError(f"{self.directory}: sequence of {self.generator.token_count() + len(ids)} tokens "
                              f"exceeds the generator's max_length ({self.max_length})")
        self.generator.append_tokens(np.asarray(ids, np.int32))
        logits = np.asarray(self.generator.get_output("logits"))[0]  # (T, V)
        return logits.astype(np.float32, copy=False)

    def reset(self) -> None:
        self.generator = self._fresh()

    def generate(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation by GenAI's own search loop: ``max_new_tokens`` ids, fewer when it stops at
        an end-of-sequence id of ``genai_config.json`` (kept as the last id)."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.asarray(prompt, np.int32))
        out: list[int] = []
        while not generator.is_done() and len(out) < max_new_tokens:
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        return out

    def weight_bytes(self) -> WeightBytes:
        graph = genai_model_files(self.directory)[0]
        return onnx_weight_bytes(graph)

    def close(self) -> None:
        self.generator = None
        self.model = None
