"""Quantize a lossless GGUF with llama.cpp's own quantizer (``llama_model_quantize``).

llama.cpp chooses each tensor's type for the file type (its own mix); the tensors a type's
``QuantSpec.keep`` names are passed as overrides (``tt_overrides``) and kept at higher precision.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from edgeft.core.errors import EdgeftError
from export.gguf.llamacpp import captured_stderr, llama_threads
from export.gguf.tables import QuantSpec


def quantize_gguf(src: Path, dst: Path, spec: QuantSpec) -> None:
    """Quantize ``src`` into ``dst`` with llama.cpp's quantizer: its mix, our higher-precision tensors."""
    from runtime.backends import import_llama_cpp  # one place sets up llama.cpp's logging and abort handling

    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(spec.file_type)
    params.nthread = llama_threads()
    if spec.embed_type is not None:
        # With tied embeddings llama.cpp quantizes token_embd as the output tensor, so both knobs.
        params.token_embedding_type = int(spec.embed_type)
        params.output_tensor_type = int(spec.embed_type)
    patterns = [p.encode() for p, _ in spec.keep]  # referenced until the call returns
    if spec.keep:
        overrides = (llama_cpp.llama_model_tensor_override * (len(spec.keep) + 1))()  # NULL-terminated
        for i, (pattern, (_, ggml_type)) in enumerate(zip(patterns, spec.keep)):
            overrides[i].pattern = pattern
            overrides[i].type = int(ggml_type)
        params.tt_overrides = overrides
    with captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        text = log.read_text(errors="replace")  # the log is gone once the block exits
    if rc != 0 or not dst.is_file():
        last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
        raise EdgeftError(f"llama.cpp could not quantize {src.name} to {spec.file_type.name} "
                          f"(return code {rc}{': ' + last.strip() if last else ''})")
