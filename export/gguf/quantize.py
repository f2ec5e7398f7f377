"""Quantize a lossless GGUF with llama.cpp's own quantizer (``llama_model_quantize``).

llama.cpp chooses each tensor's type for the file type (its own mix); the tensors a type's
``QuantSpec.keep`` names (and the user's ``--tensor-type`` ones before them) are passed as overrides
(``tt_overrides``) and stored in the type they name.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError
from export.calibration import Calibration
from export.gguf.imatrix import imatrix_metadata, imatrix_param
from export.gguf.llamacpp import captured_stderr, llama_threads
from export.gguf.tables import QuantSpec


def quantize_gguf(src: Path, dst: Path, spec: QuantSpec, *, kept: tuple[tuple[str, Any], ...] = (),
                  imatrix: dict[str, Any] | None = None, calibration: Calibration | None = None) -> None:
    """Quantize ``src`` into ``dst`` with llama.cpp's quantizer: its mix, the ``kept`` overrides ((regex,
    GGML type), first match wins; none: llama.cpp's plain mix), and the importance matrix when one is given."""
    from runtime.backends import import_llama_cpp  # one place sets up llama.cpp's logging and abort handling

    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(spec.file_type)
    params.nthread = llama_threads()
    if spec.embed_type is not None:
        # With tied embeddings llama.cpp quantizes token_embd as the output tensor, so both knobs.
        params.token_embedding_type = int(spec.embed_type)
        params.output_tensor_type = int(spec.embed_type)
    patterns = [p.encode() for p, _ in kept]  # referenced until the call returns
    if kept:
        overrides = (llama_cpp.llama_model_tensor_override * (len(kept) + 1))()  # NULL-terminated
        for i, (pattern, (_, ggml_type)) in enumerate(zip(patterns, kept)):
            overrides[i].pattern = pattern
            overrides[i].type = int(ggml_type)
        params.tt_overrides = overrides
    buffers: list[Any] = []
    if imatrix:
        params.imatrix, buffers = imatrix_param(llama_cpp, imatrix)
        if calibration is not None:
            params.kv_overrides = kv = imatrix_metadata(llama_cpp, calibration, len(imatrix))
            buffers.append(kv)
    with captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        text = log.read_text(errors="replace")  # the log is gone once the block exits
    missed = [ln.split("for", 1)[-1].strip() for ln in text.splitlines() if "did not find weights for" in ln]
    if imatrix and rc == 0 and any(m in imatrix or m.startswith("blk.") for m in missed):
        dst.unlink(missing_ok=True)
        raise EdgeftError(f"llama.cpp ignored the importance matrix for {', '.join(missed[:3])}: its names do not "
                          "match the GGUF tensors (an internal error; please report it)")
    if rc != 0 or not dst.is_file():
        last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
        raise EdgeftError(f"llama.cpp could not quantize {src.name} to {spec.file_type.name} "
                          f"(return code {rc}{': ' + last.strip() if last else ''})")
