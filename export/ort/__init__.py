"""Export a merged model as an ORT-format model for onnxruntime's mobile packages and reduced builds, and
verify it by loading the ``.ort`` file in onnxruntime (``edgeft export onnx --format ort``).

Pipeline (``export_ort``): the ONNX export's plan and PyTorch reference → the fp32 / int8 / int4 / fp16
graph as ``export.onnx`` writes it → ``write`` converts it with onnxruntime's own tool (``model.ort`` and
``model.required_operators.config``; the .onnx is not kept) → ``verify`` loads ``model.ort`` in
onnxruntime and compares whole-sequence and cached-step logits with the reference (the ONNX variant's
bars) → the record (``edgeft-verify.json``, kind ``ort``) → the folder is renamed into place.

Output directory::

    model.ort                          the graph in ORT format (same inputs/outputs as model.onnx)
    model.required_operators.config    operators for a reduced build (--include_ops_by_config)
    config.json, generation_config.json, tokenizer files
    edgeft-verify.json

On a device: ``onnxruntime-android`` / ``onnxruntime-objc`` (or a reduced build from the config) open
``model.ort`` with an ordinary ``InferenceSession``; the KV cache is driven as documented in
``export/onnx/__init__.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from edgeft.core.records import Record
from export.onnx import plan_export, written_variant
from export.onnx.plan import parse_variant
from export.onnx.record import write_onnx_record
from export.onnx.stages import Progress
from export.onnx.verify import BARS
from export.ort.verify import verify_ort
from export.ort.write import convert_to_ort
from runtime.mobile import ORT, ORT_MODEL

__all__ = ["export_ort"]


def export_ort(model_dir: Path, output: Path, *, quantize: str | None = None, overwrite: bool = False,
               calibration: Path | None = None, smooth: bool | None = None, gptq: bool | None = None,
               activation_bits: int = 8, eight_bit: Sequence[str] = ()) -> Record:
    """Write the ORT-format model of ``model_dir`` (variant ``quantize``) to ``output``, verify it, return its record.

    A failed verification is returned (status "failed") with the folder and its record written, not raised.
    """
    variant = parse_variant(quantize)
    model_dir, output = Path(model_dir), Path(output)
    tokenizer = plan_export(model_dir, output, variant, overwrite)
    bars = BARS[variant]
    progress = Progress()
    with written_variant(model_dir, output, variant, tokenizer, progress, overwrite=overwrite,
                         calibration=calibration, smooth=smooth, gptq=gptq, activation_bits=activation_bits,
                         eight_bit=eight_bit) as out:
        with progress.stage("ort", "converting to ORT format (onnxruntime tools)"):
            out.quantizer["ort_conversion"] = convert_to_ort(out.tmp)
        with progress.stage("verify", f"verifying {variant} model.ort in onnxruntime against PyTorch"):
            checks, figures = verify_ort(out.tmp, out.refs, bars, tokenizer=tokenizer)
        record = write_onnx_record(out.tmp, artifact=output, reference=model_dir, variant=variant, bars=bars,
                                   checks=checks, figures=figures, fp32_bytes=out.fp32_bytes, quantizer=out.quantizer,
                                   timings=progress.finish(), kind=ORT, size=(out.tmp / ORT_MODEL).stat().st_size)
    progress.done(record)
    return record
