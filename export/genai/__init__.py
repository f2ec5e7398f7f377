"""Export a merged model as an ONNX Runtime GenAI folder (what GenAI's Android/iOS/desktop apps load) and
verify it through ``onnxruntime_genai`` itself (``edgeft export onnx --format genai``).

Pipeline (``export_genai``): ``plan`` (the ONNX export's checks, plus a GenAI decoder type for the
architecture) → the PyTorch reference and the fp32 / int8 / int4 / fp16 graph exactly as
``export.onnx`` writes them (optimum, then edgeft's quantizers) → ``write`` adds ``genai_config.json``
(the graph's names and cache shape, EOS and the chat template's end-of-turn ids as stop ids, greedy
search) → ``verify`` runs the folder with GenAI's generator (logits, cached steps, greedy search,
tokenizer and chat template) against the reference → the record (``edgeft-verify.json``, kind
``onnx-genai``) is written, and the folder is renamed into place. No second exporter: GenAI's model
builder (``onnxruntime_genai.models.builder``) writes its own graph; edgeft ships the graph its
quantizers and bars were measured on.

Output directory::

    model.onnx (+ model.onnx_data past 2 GB)   the decoder graph (interface in export/onnx/__init__.py)
    genai_config.json                          what onnxruntime_genai.Model reads
    config.json, generation_config.json, tokenizer files, chat_template.jinja
    edgeft-verify.json

Loading it on a device::

    import onnxruntime_genai as og
    model = og.Model("DIR"); tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model); params.set_search_options(max_length=256)
    generator = og.Generator(model, params); generator.append_tokens(tokenizer.encode(prompt))
    while not generator.is_done(): generator.generate_next_token()
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from edgeft.core.records import Record
from export.genai.plan import GENAI_TYPES, genai_type, plan_genai
from export.genai.verify import verify_genai
from export.genai.write import write_genai_config
from export.onnx import written_variant
from export.onnx.plan import parse_variant
from export.onnx.record import write_onnx_record
from export.onnx.stages import Progress
from export.onnx.verify import BARS
from runtime.mobile import GENAI

__all__ = ["GENAI_TYPES", "export_genai", "genai_type"]


def export_genai(model_dir: Path, output: Path, *, quantize: str | None = None, overwrite: bool = False,
                 calibration: Path | None = None, smooth: bool | None = None, gptq: bool | None = None,
                 activation_bits: int = 8, eight_bit: Sequence[str] = ()) -> Record:
    """Write the GenAI folder of ``model_dir`` (variant ``quantize``) to ``output``, verify it, return its record.

    A failed verification is returned (status "failed") with the folder and its record written, not raised.
    """
    variant = parse_variant(quantize)
    model_dir, output = Path(model_dir), Path(output)
    tokenizer, model_type = plan_genai(model_dir, output, variant, overwrite)
    bars = BARS[variant]
    progress = Progress()
    with written_variant(model_dir, output, variant, tokenizer, progress, overwrite=overwrite,
                         calibration=calibration, smooth=smooth, gptq=gptq, activation_bits=activation_bits,
                         eight_bit=eight_bit) as out:
        with progress.stage("genai", "writing genai_config.json"):
            write_genai_config(out.tmp, model_dir, tokenizer, model_type)
        with progress.stage("verify", f"verifying {variant} through onnxruntime-genai against PyTorch"):
            checks, figures = verify_genai(out.tmp, out.refs, bars, tokenizer=tokenizer)
        record = write_onnx_record(out.tmp, artifact=output, reference=model_dir, variant=variant, bars=bars,
                                   checks=checks, figures=figures, fp32_bytes=out.fp32_bytes, quantizer=out.quantizer,
                                   timings=progress.finish(), kind=GENAI)
    progress.done(record)
    return record
