"""One small generation interface over four back-ends: PyTorch (unmerged or merged), ONNX Runtime, llama.cpp.

Every back-end takes token ids (produced once, by the reference tokenizer) and returns float32
next-token logits as numpy arrays; decoding is the same greedy loop everywhere (``greedy``)::

    backend.reset()                        # empty KV cache
    backend.prefill(ids)     -> (V,)       # whole prompt, logits after its last token
    backend.step(token)      -> (V,)       # one more token through the cache
    backend.logits(ids)      -> (T, V)     # teacher-forced logits of a whole sequence (fresh cache)

``threads`` sets the intra-op threads of each engine (torch.set_num_threads, ORT
intra_op_num_threads, llama.cpp n_threads and n_threads_batch).

Imports: torch/transformers/peft only inside ``TorchBackend``; onnxruntime inside
``OnnxBackend``; llama_cpp inside ``GgufBackend``. Importing this module needs numpy only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgeft.core.errors import EdgeftError, one_line
from runtime.artifacts import GGUF, MERGED, ONNX, ONNX_MODEL, UNMERGED, adapter_config, base_model_of, read_run
from runtime.weights import WeightBytes, gguf_weight_bytes, onnx_weight_bytes

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


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

    def weight_bytes(self) -> WeightBytes:
        raise NotImplementedError

    def close(self) -> None:
        """Release native resources (llama.cpp contexts); a no-op elsewhere."""


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


def import_engine(kind: str) -> None:
    """Import the libraries ``kind`` runs on, so that load time can be measured apart from imports."""
    if kind in (UNMERGED, MERGED):
        import torch  # noqa: F401
        import transformers  # noqa: F401

        if kind == UNMERGED:
            import peft  # noqa: F401
    elif kind == ONNX:
        import onnxruntime  # noqa: F401
    elif kind == GGUF:
        import_llama_cpp()


def open_backend(kind: str, path: str | Path, *, threads: int, max_tokens: int) -> Backend:
    """Load ``path`` with the back-end for ``kind``; ``max_tokens`` bounds prompt + generated tokens."""
    path = Path(path)
    if kind in (UNMERGED, MERGED):
        return TorchBackend(path, kind=kind, threads=threads)
    if kind == ONNX:
        return OnnxBackend(path, threads=threads)
    if kind == GGUF:
        return GgufBackend(path, threads=threads, n_ctx=max_tokens)
    raise EdgeftError(f"{path}: unknown artifact kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# PyTorch (eager, fp32 compute; the unmerged reference may hold its base in 4 bits)


class TorchBackend(Backend):
    """A transformers causal LM; an adapter directory runs unmerged (base as trained + LoRA).

    A merged directory is loaded in fp32 whatever dtype it was saved in (CPU kernels for fp16
    are slow or missing), so its figures are those of PyTorch eager fp32.
    """

    def __init__(self, path: Path, *, kind: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.kind = kind
        self.model = (self._load_unmerged(path) if kind == UNMERGED else self._load(str(path))).eval()
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.cache: Any = None

    @staticmethod
    def _load(model_dir: str, **kwargs: Any) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        kwargs.setdefault("dtype", torch.float32)
        try:
            return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False,
                                                        local_files_only=True, **kwargs)
        except Exception as e:  # transformers raises many types for unloadable directories
            raise EdgeftError(f"{model_dir}: cannot load with transformers ({one_line(e)})") from None

    def _load_unmerged(self, adapter: Path) -> Any:
        """Base model as the adapter was trained on it (4-bit when edgeft-run.json says so) + LoRA."""
        import torch
        from peft import PeftModel

        adapter_config(adapter)  # LoRA only: prompt-learning adapters do not decode through a plain cache
        run = read_run(adapter)
        base = base_model_of(adapter, run)
        quant = run.get("quantization")
        if isinstance(quant, dict) and quant.get("load_in_4bit"):
            from peft import prepare_model_for_kbit_training
            from transformers import BitsAndBytesConfig

            compute = str(quant.get("compute_dtype") or "float32").replace("torch.", "")
            load = str(run.get("torch_dtype") or run.get("dtype") or compute).replace("torch.", "")
            config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=str(quant.get("quant_type") or "nf4"),
                bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
                bnb_4bit_compute_dtype=getattr(torch, compute), bnb_4bit_quant_storage=torch.uint8,
            )
            model = self._load(base, dtype=getattr(torch, load), quantization_config=config, device_map={"": "cpu"})
            # As training did: the 16-bit weights outside the 4-bit layers are held in fp32.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            for m in model.modules():
                # bitsandbytes' CPU inference kernel casts activations to bf16; training dequantized
                # and multiplied in the compute dtype. Keep training's numerics.
                if hasattr(m, "support_avx512bf16_for_cpu"):
                    m.support_avx512bf16_for_cpu = False
        else:
            model = self._load(base)
        try:
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        except Exception as e:  # peft raises RuntimeError (shapes), ValueError (targets), KeyError
            raise EdgeftError(f"{adapter}: the adapter does not fit base {base} ({one_line(e)})") from None

    def _forward(self, ids: Sequence[int], cache: Any) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(ids)], dtype=torch.long), past_key_values=cache,
                             use_cache=cache is not None)
        return out.logits[0].float().numpy()  # (T, V)

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        if self.cache is None:
            self.reset()
        return self._forward(ids, self.cache)[-1]

    def step(self, token: int) -> np.ndarray:
        return self._forward([token], self.cache)[-1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self._forward(ids, None)

    def weight_bytes(self) -> WeightBytes:
        """Bytes of parameters and buffers-held 4-bit weights (tied tensors counted once)."""
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
        emb, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        tied = emb is not None and out is not None and emb.weight.data_ptr() == out.weight.data_ptr()
        gathered = 0 if tied or emb is None else emb.weight.numel() * emb.weight.element_size()
        return WeightBytes(total, total - gathered, "torch parameters")


# ---------------------------------------------------------------------------------------------
# ONNX Runtime (plain InferenceSession; the KV cache is driven here in numpy)


class OnnxBackend(Backend):
    """An optimum decoder export (``model.onnx`` with past_key_values inputs) on the CPU provider."""

    kind = ONNX

    def __init__(self, directory: Path, *, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.path = directory / ONNX_MODEL
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


# ---------------------------------------------------------------------------------------------
# llama.cpp (llama-cpp-python's low-level API: one batch, logits requested per position)


def import_llama_cpp() -> Any:
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
        out = []
        for text in texts:
            data = text.encode("utf-8")
            cap = len(data) + 8
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(vocab, data, len(data), buf, cap, False, True)
            if n < 0:  # buffer too small: -n is the count needed
                cap = -n
                buf = (lib.llama_token * cap)()
                n = lib.llama_tokenize(vocab, data, len(data), buf, cap, False, True)
            out.append([int(t) for t in buf[: max(n, 0)]])
        return out
    finally:
        lib.llama_model_free(model)


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
