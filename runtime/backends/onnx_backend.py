"""ONNX Runtime back-end: an optimum decoder export on a plain InferenceSession, its KV cache driven in numpy;
the same graph converted to ORT format (``model.ort``, what a reduced mobile build of onnxruntime loads).

onnxruntime is imported inside ``OnnxBackend``; this module never imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeft.core.errors import EdgeftError, one_line
from runtime.artifacts import ONNX, ONNX_MODEL
from runtime.mobile import ORT, ORT_MODEL
from runtime.backends.base import Backend
from runtime.weights import WeightBytes, onnx_weight_bytes

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


class OnnxBackend(Backend):
    """An optimum decoder export (``model.onnx`` with past_key_values inputs) on the CPU provider."""

    kind = ONNX
    model_file = ONNX_MODEL

    def __init__(self, directory: Path, *, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.path = directory / self.model_file
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # an op without a CPU kernel, a damaged file
            raise EdgeftError(f"{self.path}: onnxruntime cannot load it ({one_line(e)})") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = sorted((n for n in inputs if _PAST.match(n)), key=lambda n: (int(_PAST.match(n)[1]), n))
        if "input_ids" not in inputs or not self.past:
            raise EdgeftError(f"{self.path}: not a decoder with KV cache (needs input_ids and past_key_values.* inputs)")
        shape = inputs[self.past[0]].shape  # (batch, kv_heads, past_len, head_dim); heads and dim are static
        self.kv_shape = (1, int(shape[1]), 0, int(shape[3]))
        self.kv_dtype = np.float16 if "float16" in inputs[self.past[0]].type else np.float32
        self.has_mask = "attention_mask" in inputs
        self.has_positions = "position_ids" in inputs
        self.outputs = [o.name for o in self.session.get_outputs()]
        # present.{i}.key feeds past_key_values.{i}.key on the next call
        self.present = {n: n.replace("past_key_values.", "present.") for n in self.past}
        missing = [p for p in [*self.present.values(), "logits"] if p not in self.outputs]
        if missing:
            raise EdgeftError(f"{self.path}: outputs {', '.join(missing)} missing (expected logits and present.*)")
        self.n_vocab = int(self.session.get_outputs()[self.outputs.index("logits")].shape[-1] or 0)
        self.cache: dict[str, np.ndarray] = {}
        self.n_past = 0

    def _run(self, ids: Sequence[int], past: dict[str, np.ndarray], n_past: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = len(ids)
        feed: dict[str, np.ndarray] = {"input_ids": np.asarray([ids], np.int64), **past}
        if self.has_mask:
            feed["attention_mask"] = np.ones((1, n_past + n), np.int64)
        if self.has_positions:
            feed["position_ids"] = np.arange(n_past, n_past + n, dtype=np.int64)[None]
        outs = dict(zip(self.outputs, self.session.run(None, feed)))
        present = {p: outs[o] for p, o in self.present.items()}
        logits = outs["logits"][0]  # (T, V)
        self.n_vocab = logits.shape[-1]
        return logits.astype(np.float32, copy=False), present

    def _empty(self) -> dict[str, np.ndarray]:
        return {n: np.zeros(self.kv_shape, self.kv_dtype) for n in self.past}

    def reset(self) -> None:
        self.cache, self.n_past = self._empty(), 0

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        if not self.cache:
            self.reset()
        logits, self.cache = self._run(ids, self.cache, self.n_past)
        self.n_past += len(ids)
        return logits[-1]

    def step(self, token: int) -> np.ndarray:
        return self.prefill([token])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        logits, _ = self._run(ids, self._empty(), 0)
        return logits

    def weight_bytes(self) -> WeightBytes:
        return onnx_weight_bytes(self.path)


class OrtFormatBackend(OnnxBackend):
    """The ORT-format conversion of an export (``model.ort``): same inputs, outputs and cache as ``model.onnx``."""

    kind = ORT
    model_file = ORT_MODEL

    def weight_bytes(self) -> WeightBytes:
        # The flatbuffer holds the initializers; the onnx package cannot read it, so the file size stands in.
        size = self.path.stat().st_size
        return WeightBytes(size, size, "ORT file size")
