"""Export a merged Hugging Face model to GGUF for llama.cpp, and verify it against PyTorch.

``export_gguf`` (below) runs the stages in order, one module each:

- ``plan.py``: read config, tokenizer (``vocab.py``) and safetensors headers and decide
  everything; every problem is reported at once, before any work;
- ``write.py``: metadata, vocabulary and tensors (f32/f16/bf16) into one GGUF file, each tensor
  through its architecture's transform (``transforms.py``);
- ``quantize.py``: llama.cpp's own quantizer for q8_0 and the k-quants, from a lossless
  intermediate, keeping the tensors ``tables.QUANT_TYPES`` names (measured there) at higher
  precision; ``tensor_types.py`` says where each tensor's type is chosen; before it, with
  calibration rows, ``smoothing`` (export/smoothing.py), the importance matrix (``imatrix.py``) and,
  for q8_0 on request (``--gptq``), GPTQ onto its grid (``gptq.py``), as the type's table row says;
- ``verify.py``: tokenisation, teacher-forced logits and a greedy chat continuation through
  llama.cpp, compared with the HF tokenizer and the merged PyTorch model;
- ``modelfile.py``: an Ollama Modelfile beside the GGUF;
- ``record.py``: the verdict and the figures, as a ``Record``.

The data all of them read (architectures, types and their bars, pre-tokenizers, chat formats,
verification samples) is in ``tables.py``. The verdict is written next to the file as
``FILE.gguf.verify.json`` (``edgeft.core.records``); a failed check still writes it, marked
failed. The GGUF is written, verified and recorded under a temporary name, then renamed into
place: a file under the final name always has its record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgeft.core.errors import ConfigError
from edgeft.core.fsutil import atomic_file, ensure_free_space
from edgeft.core.progress import say
from edgeft.core.records import Record, write_record
from export.calibration import Calibration, load_calibration
from export.evalrows import MAX_ROWS as MAX_EVAL_ROWS, load_eval_rows
from export.gguf.gptq import GPTQ_TYPE, not_reproduced, write_gptq
from export.gguf.imatrix import importance_matrix
from export.gguf.modelfile import write_modelfile
from export.gguf.plan import ExportPlan, plan_export
from export.gguf.quantize import quantize_gguf
from export.gguf.record import gguf_record
from export.gguf.tables import PRECISIONS, QuantOptions
from export.gguf.tensor_types import choose_tensor_type, gguf_tensor_types
from export.gguf.verify import verify_gguf
from export.gguf.write import write_gguf
from export.smoothing import MAX_ROWS as SMOOTHING_ROWS, write_smoothed

__all__ = ["export_gguf", "gguf_tensor_types"]


def export_gguf(model_dir: Path, output: Path, *, qtype: str = "f16", overwrite: bool = False,
                calibration: Path | None = None, eval_data: Path | None = None,
                quant_options: QuantOptions | None = None, max_eval_rows: int = MAX_EVAL_ROWS) -> Record:
    """Export a merged HF model directory to a GGUF file, verify it, and write its record.

    ``calibration``: rows (normally the training data) for llama.cpp's importance matrix, used for
    the types whose table row says so. ``eval_data``: the user's evaluation rows (the first
    ``max_eval_rows``); verification then also compares on them and decides on them. Returns the record (also written to
    ``OUTPUT.verify.json``); a failed verification is a record with status "failed", not an
    exception. User errors (unsupported architecture, missing tokenizer, unreadable weights,
    existing output, unusable calibration rows) raise ``EdgeftError`` before any file is written.
    """
    t_start = time.perf_counter()
    plan = plan_export(Path(model_dir), Path(output), qtype, overwrite)
    opts = quant_options or QuantOptions()
    if (opts.smooth or opts.gptq) and calibration is None:
        flag = "--smooth" if opts.smooth else "--gptq"
        raise ConfigError(f"{flag} needs --calibration FILE (rows the model will see, e.g. the training data)")
    if opts.gptq and plan.qtype != GPTQ_TYPE:
        raise ConfigError(f"--gptq rounds onto {GPTQ_TYPE}'s grid: use it with --type {GPTQ_TYPE}, not {plan.qtype}")
    check_tensor_types(plan, opts)
    calib = (load_calibration(calibration, plan.vocab.hf_tokenizer)
             if calibration is not None and not plan.spec.direct
             and (opts.use_imatrix(plan.spec) or opts.use_smooth(plan.spec) or opts.use_gptq(plan.spec)) else None)
    evals = load_eval_rows(eval_data, plan.vocab.hf_tokenizer, max_rows=max_eval_rows) if eval_data is not None else None
    out = plan.output
    smoothed_copy = sum(t.file.stat().st_size for t in {t.file: t for t in plan.tensors}.values()) \
        if calib is not None and opts.use_smooth(plan.spec) else 0
    gptq_copy = 4 * plan.n_params if calib is not None and opts.use_gptq(plan.spec) else 0  # float32 checkpoint
    ensure_free_space(out, _space_needed(plan, gptq=bool(gptq_copy)) + smoothed_copy + gptq_copy, "the GGUF export")

    timings: dict[str, float] = {}
    # The file is verified and recorded under its temporary name, then renamed: whatever sits
    # under the final name has its record beside it, bound to its bytes.
    with atomic_file(out) as tmp:
        quant = _write(plan, tmp, timings, calib, opts)
        with _timed(timings, "verify_s"):
            say(f"verifying {out.name} against the PyTorch model")
            checks, verify_metrics = verify_gguf(tmp, plan.model_dir, plan.spec, plan.vocab.hf_tokenizer, evals)
        modelfile = write_modelfile(out, plan.vocab)
        timings["total_s"] = time.perf_counter() - t_start
        record = gguf_record(plan, tmp, checks, {**verify_metrics, "quantization": quant}, modelfile, timings)
        write_record(out, record, data=tmp)
    return record


def _write(plan: ExportPlan, dst: Path, timings: dict[str, float], calib: Calibration | None,
           opts: QuantOptions) -> dict[str, Any]:
    """The GGUF of ``plan.qtype`` into ``dst``: written directly (f32/f16/bf16), or a lossless
    intermediate in the source precision, then llama.cpp's quantizer; returns how it was quantized."""
    if plan.spec.direct:
        with _timed(timings, "write_s"):
            write_gguf(plan, dst, plan.qtype)
        return {"quantizer": None}
    # A ".NAME.PID*.partial" name: the next export to this name removes it if this process dies first.
    inter = plan.output.with_name(f".{plan.output.name}.{os.getpid()}.intermediate.partial")
    matrix, smoothing, gptq, rounded = None, None, None, []
    with tempfile.TemporaryDirectory(prefix=f".{plan.output.name}.{os.getpid()}.", suffix=".partial",
                                     dir=plan.output.parent) as work:
        source = plan
        if calib is not None and opts.use_smooth(plan.spec):
            with _timed(timings, "smooth_s"):
                say(f"smoothing outlier activations (first {min(calib.rows, SMOOTHING_ROWS)} calibration rows)")
                smoothed = smoothed_plan(plan, Path(work) / plan.model_dir.name)
                smoothing = write_smoothed(plan.model_dir, calib, smoothed.model_dir, forced=opts.smooth is True,
                                           layers=plan.spec.smooth_layers)
                source = plan if "skipped" in smoothing else smoothed
        if calib is not None and opts.use_gptq(plan.spec):
            with _timed(timings, "gptq_s"):
                say(f"GPTQ onto {plan.qtype}'s grid ({calib.rows} calibration rows, {calib.tokens} tokens)")
                source, gptq, rounded = write_gptq(source, calib, Path(work) / "gptq", overrides=opts.overrides(plan.spec))
        try:
            with _timed(timings, "write_s"):
                write_gguf(source, inter, source.source_dtype)
            if calib is not None and opts.use_imatrix(plan.spec):
                with _timed(timings, "imatrix_s"):
                    say(f"importance matrix from {calib.rows} calibration rows ({calib.tokens} tokens)")
                    matrix = importance_matrix(source, calib)
            with _timed(timings, "quantize_s"):
                say(f"quantizing to {plan.qtype} with llama.cpp")
                quantize_gguf(inter, dst, plan.spec, kept=opts.overrides(plan.spec), imatrix=matrix, calibration=calib)
            if gptq is not None:  # llama.cpp must have stored GPTQ's values, not rounded them again
                gptq["tensors_not_reproduced"] = not_reproduced(inter, dst, rounded)
        finally:
            inter.unlink(missing_ok=True)
    return {"quantizer": "llama.cpp llama_model_quantize",
            "kept_above_type": [p for p, _ in plan.spec.keep] if opts.keep else [],
            "tensor_types": [f"{p}={t.name.lower()}" for p, t in opts.tensor_types],
            "imatrix": ({**calib.describe(), "entries": len(matrix)} if calib is not None and matrix else None),
            "smoothing": smoothing, "gptq": gptq}


def check_tensor_types(plan: ExportPlan, opts: QuantOptions) -> None:
    """``--tensor-type`` needs a quantized type, and each NAME must match a 2-D tensor of this model."""
    if not opts.tensor_types:
        return
    if plan.spec.direct:
        raise ConfigError(f"--tensor-type: --type {plan.qtype} stores every tensor as it is; use it with a quantized type")
    names = [t.gguf_name for t in plan.tensors if len(t.shape) == 2]
    for pattern, ggml_type in opts.tensor_types:
        if not any(re.search(pattern, n) for n in names):
            example = next((n for n in names if n.startswith("blk.")), names[0])
            raise ConfigError(f"--tensor-type {pattern}={ggml_type.name.lower()}: matches no tensor of this model "
                              f"(names look like {example})")


def smoothed_plan(plan: ExportPlan, directory: Path) -> ExportPlan:
    """``plan`` reading its tensors from ``directory`` (where the smoothed checkpoint is written, same file names)."""
    return dataclasses.replace(plan, model_dir=directory,
                               tensors=[dataclasses.replace(t, file=directory / t.file.name) for t in plan.tensors])


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Seconds the block took, into ``timings[key]`` (nothing when it raises)."""
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def _space_needed(plan: ExportPlan, gptq: bool = False) -> int:
    """Bytes the export needs at its peak (intermediate + quantized file), with some slack."""
    if plan.spec.direct:
        need = sum(int(np.prod(t.shape)) * PRECISIONS[choose_tensor_type(t.shape, plan.qtype)].nbytes
                   for t in plan.tensors)
    else:
        inter = PRECISIONS["f32" if gptq else plan.source_dtype].nbytes
        need = (sum(int(np.prod(t.shape)) * inter for t in plan.tensors)
                + int(plan.n_params * plan.spec.bits_per_weight / 8))
    return int(need * 1.05) + (32 << 20)
