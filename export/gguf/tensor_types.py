"""Where each tensor's GGUF type is chosen, and what each tensor got.

- ``--type f32|f16|bf16`` (``QUANT_TYPES[...].direct``): ``choose_tensor_type`` below, as
  ``write.py`` writes the file: 2-D weights in that precision, 1-D tensors (norms, biases) f32.
- ``--type q8_0`` and the k-quants: ``write.py`` first writes a lossless intermediate, its 2-D
  weights in ``intermediate_precision`` (the checkpoint's own dtype); llama.cpp's quantizer
  (``quantize.py``) then picks each tensor's type for the file type (its own mix), except the
  tensors ``QUANT_TYPES[...].keep`` names, kept at the type given there (measured in ``tables.py``).
- ``gguf_tensor_types`` reads back the type every tensor of a written file has.
"""

from __future__ import annotations

from pathlib import Path


def choose_tensor_type(shape: tuple[int, ...], precision: str) -> str:
    """The type (f32 | f16 | bf16) ``write.py`` stores a tensor of ``shape`` in, in a ``precision`` file."""
    # 1-D tensors (norms, biases) stay f32, as llama.cpp's converter keeps them.
    return precision if len(shape) > 1 else "f32"


def intermediate_precision(weight_dtypes: set[str]) -> str:
    """The lossless precision to write before quantizing: the dtype of the 2-D source tensors,
    f32 when they mix dtypes."""
    return next(iter(weight_dtypes)) if len(weight_dtypes) == 1 else "f32"


def gguf_tensor_types(path: Path) -> dict[str, str]:
    """Tensor name -> GGML type name, read from the GGUF header alone (``runtime.weights``)."""
    from runtime.weights import read_gguf_header

    return {t.name: t.ggml_type for t in read_gguf_header(path).tensors}
