"""One small generation interface over the back-ends: PyTorch (unmerged or merged), ONNX Runtime (ONNX and
ORT format), llama.cpp, ONNX Runtime GenAI, ExecuTorch.

Every back-end takes token ids (produced once, by the reference tokenizer) and returns float32
next-token logits as numpy arrays; decoding is the same greedy loop everywhere (``greedy``)::

    backend.reset()                        # empty KV cache
    backend.prefill(ids)     -> (V,)       # whole prompt, logits after its last token
    backend.step(token)      -> (V,)       # one more token through the cache
    backend.logits(ids)      -> (T, V)     # teacher-forced logits of a whole sequence (fresh cache)

``threads`` sets the intra-op threads of each engine (torch.set_num_threads, ORT
intra_op_num_threads, llama.cpp n_threads and n_threads_batch).

Modules:

- ``base.py``: the ``Backend`` interface and ``greedy``;
- ``torch_backend.py``: ``TorchBackend`` (torch/transformers/peft imported inside it only);
- ``onnx_backend.py``: ``OnnxBackend`` and ``OrtFormatBackend`` (onnxruntime imported inside them only; never torch);
- ``genai_backend.py``: ``GenaiBackend`` (onnxruntime_genai's generator; never torch);
- ``executorch_backend.py``: ``ExecutorchBackend`` (executorch's Python runtime, which loads torch itself);
- ``llama_backend.py``: ``GgufBackend``, ``import_llama_cpp`` and ``gguf_tokenize`` (llama_cpp);
- ``dispatch.py``: ``import_engine`` and ``open_backend``, from an artifact kind to its back-end.

Importing this package needs numpy only.
"""

from runtime.backends.base import Backend, greedy
from runtime.backends.dispatch import import_engine, open_backend
from runtime.backends.executorch_backend import ExecutorchBackend
from runtime.backends.genai_backend import GenaiBackend
from runtime.backends.llama_backend import GgufBackend, gguf_tokenize, import_llama_cpp
from runtime.backends.onnx_backend import OnnxBackend, OrtFormatBackend
from runtime.backends.torch_backend import TorchBackend

__all__ = [
    "Backend",
    "ExecutorchBackend",
    "GenaiBackend",
    "GgufBackend",
    "OnnxBackend",
    "OrtFormatBackend",
    "TorchBackend",
    "gguf_tokenize",
    "greedy",
    "import_engine",
    "import_llama_cpp",
    "open_backend",
]
