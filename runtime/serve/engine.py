"""The served model: an artifact loaded once, N decoding slots on its weights, task adapters, and one
request's generation (``Decoding``), token by token.

``Engine`` checks the artifact and its adapters first (``gate.py``), opens the artifact with its
back-end from ``runtime.backends`` (the ONNX and GGUF ones never import torch), and clones the
back-end into slots that share the weights; a GGUF base (llama.cpp LoRA files) or a PyTorch base
(PEFT named adapters) loads its task adapters once and each slot applies the one a request names.
A slot's prompt evaluation starts from the first token its cache does not already hold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.core.errors import ConfigError, EdgeftError
from runtime.artifacts import GGUF, UNMERGED, base_model_of, detect_kind
from runtime.backends import Backend, open_backend
from runtime.backends.llama_backend import gguf_trained_context
from runtime.serve.codec import Codec, open_codec
from runtime.serve.gate import check_served
from runtime.serve.sampling import StopText, pick_token


@dataclass
class SamplingParams:
    """How one request decodes."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class RequestTimeout(Exception):
    """A generation ran past the per-request timeout."""


class Decoding:
    """One request on one slot: ``advance`` decodes one token and returns the text it adds."""

    def __init__(self, backend: Backend, codec: Codec, prompt: list[int], params: SamplingParams,
                 adapter: str | None) -> None:
        self.backend, self.codec, self.prompt, self.params, self.adapter = backend, codec, prompt, params, adapter
        self.rng = np.random.default_rng(params.seed)
        self.text, self.stop = codec.stream(), StopText(params.stop)
        self.logits: np.ndarray | None = None
        self.completion_tokens = 0
        self.reused_tokens = 0  # prompt ids the slot's cache already held (not evaluated again)
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def advance(self) -> str:
        """Prefill on the first call (from the first id the slot's cache does not hold); then pick one
        token, and step the cache unless generation ends."""
        if self.logits is None:
            self.backend.use_adapter(self.adapter)
            self.logits, self.reused_tokens = self.backend.prefill_reusing(self.prompt)
        p = self.params
        token = pick_token(self.logits, p.temperature, p.top_p, self.rng)
        if token in self.codec.stop_ids:
            self.finish_reason = "stop"
            return self.stop.flush()
        self.completion_tokens += 1
        out = self.stop.feed(self.text.push(token))
        if self.stop.stopped:
            self.finish_reason = "stop"
        elif self.completion_tokens >= p.max_tokens:
            self.finish_reason = "length"
            out += self.stop.flush()
        else:
            self.logits = self.backend.step(token)
        return out

    def run(self, deadline: float) -> str:
        """The whole answer, or ``RequestTimeout`` once ``deadline`` (time.monotonic) has passed."""
        parts = []
        while not self.done:
            if time.monotonic() > deadline:
                raise RequestTimeout
            parts.append(self.advance())
        return "".join(parts)


class Engine:
    """The artifact, its codec, its slots (back-ends sharing the weights) and its model ids."""

    def __init__(self, artifact: Path, *, slots: int, threads: int, n_ctx: int, allow_unverified: bool,
                 adapters: dict[str, Path] | None = None, name: str | None = None) -> None:
        self.path = artifact
        kind = detect_kind(artifact)
        if kind is None:
            raise EdgeftError(f"{artifact}: not an artifact edgeft serves (a .gguf file, an ONNX export, "
                              "a merged model directory or an adapter directory)")
        self.kind = kind
        self.model_id = name or artifact.name
        adapters = dict(adapters or {})
        if self.model_id in adapters:
            raise ConfigError(f"--adapter {self.model_id}: the base model's own id (choose another name, or --name)")
        check_served(artifact, kind, adapters, allow_unverified)
        self.n_ctx = min(n_ctx, self._trained_context() or n_ctx)
        first = open_backend(kind, artifact, threads=threads, max_tokens=self.n_ctx)
        self.backends: list[Backend] = [first]
        try:
            for adapter_name, path in adapters.items():
                first.load_adapter(adapter_name, path)
            self.backends += [first.clone() for _ in range(slots - 1)]
            self.codec = open_codec(kind, artifact, first, self._tokenizer_dirs())
        except BaseException:
            self.close()
            raise
        self.adapters = sorted(adapters)

    def _tokenizer_dirs(self) -> list[Path]:
        if self.kind == UNMERGED:
            return [self.path, Path(base_model_of(self.path))]
        return [self.path]

    def _trained_context(self) -> int | None:
        """The context the model was trained for (llama.cpp's n_ctx_train, config.json's max positions)."""
        if self.kind == GGUF:
            return gguf_trained_context(self.path) or None
        from runtime.modelfiles import read_model_config

        directory = Path(base_model_of(self.path)) if self.kind == UNMERGED else self.path
        value = read_model_config(str(directory)).get("max_position_embeddings")
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def model_ids(self) -> list[str]:
        return [self.model_id, *self.adapters]

    def adapter_of(self, model: str) -> str | None:
        """The task adapter a request's ``model`` names (None: the plain artifact); KeyError if unknown."""
        if model == self.model_id:
            return None
        if model in self.adapters:
            return model
        raise KeyError(model)

    def close(self) -> None:
        for backend in reversed(self.backends):  # clones before the one that owns the weights
            backend.close()
        self.backends = []
