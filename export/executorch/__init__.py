"""Export a merged model as an ExecuTorch program for phones (``edgeft export executorch``): XNNPACK-
delegated ``model.pte`` with a static KV cache, fp32, 8da8w or 8da4w, verified with executorch's own runtime.

Pipeline (``export_executorch``): ``plan`` (quantization, architecture, output, source directory,
executorch installed, disk space; all before weights load) → the PyTorch fp32 reference
(``export.onnx.reference``) → with calibration rows, the outlier smoothing folded into the fp32 weights
(``export.smoothing``; exact) → ``write`` (torchao 8da8w / 8da4w where asked, ``torch.export`` with a
dynamic sequence length, XNNPACK lowering, ``model.pte``) → ``verify`` (executorch's runtime against the
reference) → the record (``edgeft-verify.json``, kind ``executorch``) → the folder is renamed into place.

What works with the pinned torch 2.13 / transformers 4.57: executorch 1.5.1 + torchao 0.18 (the
``mobile`` extra) lower and run llama-family decoders; optimum-executorch (needs transformers 5) is
not used. executorch's Python runtime links libtorch, so verification and ``edgeft bench`` run the
program with torch loaded; on a phone the C++ runtime runs it without.

Output directory::

    model.pte                  the program: forward(input_ids (1, T), cache_position (T,)) -> logits (1, T, V)
    edgeft-executorch.json     max_seq_len, vocab size, quantization, the method's inputs and outputs
    config.json, generation_config.json, tokenizer files
    edgeft-verify.json
"""

from __future__ import annotations

import gc
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgeft.core.fsutil import atomic_dir, dir_size
from edgeft.core.records import Record, write_record
from export.executorch.plan import (ARCHITECTURES, MAX_SEQ_LEN_DEFAULT, QUANTIZATIONS, SMOOTHED_QUANTIZATIONS,
                                    plan_executorch)
from export.executorch.verify import BARS, verify_program
from export.executorch.write import write_program
from export.onnx import load_reference, smoothing_calibration
from export.onnx.record import versions
from export.onnx.stages import Progress, quiet
from export.smoothing import MAX_ROWS as SMOOTHING_ROWS, smooth_model
from runtime.backends.torch_backend import own_weights
from runtime.mobile import EXECUTORCH, PTE_MODEL

__all__ = ["ARCHITECTURES", "BARS", "MAX_SEQ_LEN_DEFAULT", "QUANTIZATIONS", "SMOOTHED_QUANTIZATIONS", "export_executorch"]


def export_executorch(model_dir: Path, output: Path, *, quantize: str = "8da4w", max_seq_len: int = MAX_SEQ_LEN_DEFAULT,
                      overwrite: bool = False, calibration: Path | None = None, smooth: bool | None = None) -> Record:
    """Write the ExecuTorch program of ``model_dir`` to ``output``, verify it, and return its record.

    ``calibration``: rows (normally the training data) the quantized programs are smoothed on before
    lowering (on for the quantizations ``SMOOTHED_QUANTIZATIONS`` names unless ``smooth`` says otherwise).
    A failed verification is returned (status "failed") with the program and its record written, not raised.
    """
    model_dir, output = Path(model_dir), Path(output)
    tokenizer = plan_executorch(model_dir, output, quantize, max_seq_len, overwrite)
    calib = smoothing_calibration(calibration, tokenizer, quantize, smooth, SMOOTHED_QUANTIZATIONS)
    bars = BARS[quantize]
    progress = Progress()
    with quiet():
        model, refs = load_reference(model_dir, tokenizer, progress)
        own_weights(model)  # torch.export keeps the traced tensors after it returns
        smoothing = None
        if calib is not None:  # after the reference: the fold is exact, the program is judged against the original
            rows = min(calib.rows, SMOOTHING_ROWS)
            with progress.stage("smooth", f"smoothing outlier activations (first {rows} calibration rows)"):
                smoothing = smooth_model(model, calib, forced=smooth is True)
        with atomic_dir(output, overwrite=overwrite) as tmp:
            with progress.stage("export", f"exporting {quantize} to ExecuTorch (torch.export, XNNPACK)"):
                settings = write_program(model, model_dir, tmp, quantize=quantize, max_seq_len=max_seq_len)
            if smoothing is not None:
                settings["smoothing"] = smoothing
            del model
            gc.collect()
            with progress.stage("verify", f"verifying {quantize} with executorch's runtime against PyTorch"):
                checks, figures = verify_program(tmp, refs, bars, tokenizer=tokenizer)
            record = Record(artifact=str(output), kind=EXECUTORCH, reference=str(model_dir), checks=checks, metrics={
                "variant": quantize, "size_bytes": (tmp / PTE_MODEL).stat().st_size, "dir_bytes": dir_size(tmp),
                "quantizer": settings, "timings": progress.finish(), **figures, "bars": asdict(bars),
                "versions": versions(("executorch", "torchao")),
            })
            write_record(tmp, record)
    progress.done(record)
    return record
