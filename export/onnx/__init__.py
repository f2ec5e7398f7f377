"""Export a merged Hugging Face causal LM to ONNX with a KV cache, optionally quantize it, and verify it.

Pipeline (``export_onnx``), one module per stage: ``plan`` checks the model directory (config,
safetensors, tokenizer), the output path and the free space → ``reference`` loads the PyTorch model
in fp32 and records the reference (logits and a greedy continuation for a few sample texts, one of
them chat-formatted) → with calibration rows, the outlier smoothing (``export/smoothing.py``) and GPTQ
onto the variant's grids (``gptq``) change the PyTorch weights → ``write`` exports fp32 through optimum
(task ``text-generation-with-past``) into a temporary directory → ``quantize`` derives the requested variant (int8 / int4 / fp16, with
the graph edits in ``graph``) from that fp32 graph → ``verify`` compares the variant with the
reference → ``record`` writes ``edgeft-verify.json``, and the directory is renamed into place.
A failed verification still writes the directory and a record marked ``failed``. Variant settings
and their measured figures are in ``quantize``'s docstring, the bars each must meet in ``verify``.

Output directory (one variant per directory; loads with
``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(DIR)``)::

    model.onnx                 the graph (fp32, fp16, int8 or int4 weights)
    model.onnx_data            external weights, only when the graph is over 2 GB
    config.json, generation_config.json
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja (as the source has them)
    edgeft-verify.json         the verification record

Driving ``model.onnx`` with plain ``onnxruntime.InferenceSession`` (no optimum, no torch)::

    inputs
      input_ids                    int64  (batch, seq)
      attention_mask               int64  (batch, past_len + seq)   1 = real token, 0 = padding
      position_ids                 int64  (batch, seq)              cumsum(attention_mask) - 1, last `seq`
                                                                    columns (padding positions: any value, e.g. 1)
      past_key_values.{i}.key      float32 (batch, num_kv_heads, past_len, head_dim)   i = 0 .. layers-1
      past_key_values.{i}.value    float32 (batch, num_kv_heads, past_len, head_dim)
    outputs
      logits                       float32 (batch, seq, vocab)
      present.{i}.key / .value     float32 (batch, num_kv_heads, past_len + seq, head_dim)

    The first call (prefill) passes the whole prompt with empty past tensors (``past_len`` = 0);
    each later call passes only the new token(s) and feeds ``present.{i}.*`` back as
    ``past_key_values.{i}.*``. Inputs and outputs are float32 in every variant (the fp16 graph
    casts at its edges). Padding goes on the left. ``num_kv_heads`` and ``head_dim`` are static
    in the graph's input shapes; ``runtime`` can read them from ``session.get_inputs()``.
    ``verify.OrtLM`` is a small driver of exactly this interface.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from edgeft.core.errors import ConfigError
from edgeft.core.fsutil import atomic_dir, ensure_free_space
from edgeft.core.records import Record
from export.calibration import Calibration, load_calibration
from export.evalrows import MAX_ROWS as MAX_EVAL_ROWS, load_eval_rows, reference_answers
from export.onnx.gptq import not_reproduced, round_model
from export.onnx.graph import embedding_to_fp16, split_float_zero_points, untie_lm_head
from export.onnx.plan import (VARIANTS, Source, check_eight_bit, check_output, inspect_model_dir, parse_variant,
                              space_needed)
from export.massive_inputs import massive_inputs
from export.onnx.quantize import (GPTQ_VARIANTS, SMOOTHED_VARIANTS, Int4Settings, Int8Settings, make_variant,
                                  variant_settings)
from export.onnx.record import write_onnx_record
from export.onnx.reference import GREEDY_TOKENS, Reference, load_torch, sample_prompts, torch_reference
from export.onnx.stages import Progress, quiet
from export.smoothing import MAX_ROWS as SMOOTHING_ROWS, smooth_model
from export.onnx.verify import BARS, Bars, OrtLM, verify_variant
from export.onnx.write import export_fp32, onnx_size
from runtime.modelfiles import load_tokenizer

__all__ = [
    "BARS", "Bars", "Int4Settings", "Int8Settings", "OrtLM", "Source", "VARIANTS",
    "embedding_to_fp16", "export_onnx", "inspect_model_dir", "load_reference", "plan_export", "smoothing_calibration",
    "split_float_zero_points",
    "untie_lm_head", "write_variant", "written_variant",
]

_FP32_WORK_DIR = ".fp32"  # inside the temporary output directory; removed before the rename


def export_onnx(model_dir: Path, output: Path, *, quantize: str | None = None, overwrite: bool = False,
                eval_data: Path | None = None, calibration: Path | None = None, smooth: bool | None = None,
                gptq: bool | None = None, max_eval_rows: int = MAX_EVAL_ROWS, activation_bits: int = 8,
                eight_bit: Sequence[str] = ()) -> Record:
    """Export ``model_dir`` to ONNX in ``output`` (one variant), verify it, and return its record.

    ``quantize``: None (fp32), "int8", "int4" or "fp16". ``eval_data``: the user's evaluation rows;
    the agreement bars are then decided on them (``export.evalrows``). ``calibration``: rows (normally
    the training data) for the outlier smoothing of the quantized variants (``export.smoothing``; on for
    the variants ``SMOOTHED_VARIANTS`` names unless ``smooth`` says otherwise) and for ``gptq`` (int8/int4:
    the decoder's weights rounded onto the variant's grid by GPTQ, ``export/onnx/gptq.py``; None: on for the
    variants ``GPTQ_VARIANTS`` names when ``calibration`` is given). The record is also written to
    ``output/edgeft-verify.json``; a failed verification is returned (status "failed"), not raised.
    ``activation_bits``: 16 lets int8/int4's int8 kernels see each input as two 8-bit rows (``quantize``).
    ``eight_bit``: int4 only, regular expressions naming more PyTorch modules to keep at 8 bits
    (``--eight-bit``; each must match a linear layer of the decoder).
    """
    variant = parse_variant(quantize)
    check_variant_options(variant, activation_bits, eight_bit)
    model_dir, output = Path(model_dir), Path(output)
    tokenizer = plan_export(model_dir, output, variant, overwrite)
    check_eight_bit(model_dir, eight_bit)
    evals = load_eval_rows(eval_data, tokenizer, max_rows=max_eval_rows) if eval_data is not None else None
    calib, smoothed, rounds = calibration_plan(calibration, tokenizer, variant, smooth, gptq, activation_bits)
    bars = BARS[variant]  # this package's table, read per call (tests replace it to force a failure)

    progress = Progress()
    with quiet():
        model, refs = load_reference(model_dir, tokenizer, progress)
        eval_ref = None
        if evals is not None:
            with progress.stage("reference_rows", f"PyTorch reference on {len(evals.rows)} evaluation rows"):
                eval_ref = reference_answers(model, tokenizer, evals, model_dir=model_dir)
        with atomic_dir(output, overwrite=overwrite) as tmp:
            fp32_bytes, quantizer = write_variant(model, model_dir, tmp, variant, progress, calib, smooth=smoothed,
                                                  forced_smoothing=smooth is True, gptq=rounds, refs=refs,
                                                  activation_bits=activation_bits, eight_bit=tuple(eight_bit))
            del model  # the reference is all verification needs; free the weights before ORT loads
            gc.collect()
            with progress.stage("verify", f"verifying {variant} against PyTorch"):
                checks, figures = verify_variant(tmp, refs, bars, tokenizer=tokenizer, eval_ref=eval_ref)
            record = write_onnx_record(tmp, artifact=output, reference=model_dir, variant=variant, bars=bars,
                                       checks=checks, figures=figures, fp32_bytes=fp32_bytes,
                                       quantizer=quantizer, timings=progress.finish())
    progress.done(record)
    return record


def plan_export(model_dir: Path, output: Path, variant: str, overwrite: bool) -> Any:
    """Every check that needs no weights (output path, model directory, free space); returns the tokenizer."""
    check_output(output, overwrite)
    source = inspect_model_dir(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    ensure_free_space(output, space_needed(source, variant), "the ONNX export")
    return tokenizer


def load_reference(model_dir: Path, tokenizer: Any, progress: Progress) -> tuple[Any, list[Reference]]:
    """The fp32 PyTorch model and its reference on the sample prompts."""
    with progress.stage("load", f"loading {model_dir.name} (PyTorch, fp32)"):
        model = load_torch(model_dir)
    with progress.stage("reference", "PyTorch reference: logits and greedy continuation"):
        refs = torch_reference(model, sample_prompts(tokenizer), GREEDY_TOKENS)
    return model, refs


def smoothing_calibration(calibration: Path | None, tokenizer: Any, variant: str, smooth: bool | None,
                          smoothed: Mapping[str, bool] = SMOOTHED_VARIANTS) -> Calibration | None:
    """The calibration rows the variant is smoothed with, or None (no rows, not wanted, or fp32/fp16).
    ``smoothed``: the variants that can be smoothed -> whether they are by default (ONNX's table unless given)."""
    wanted = smoothed.get(variant, False) if smooth is None else smooth and variant in smoothed
    if smooth and variant not in smoothed:
        raise ConfigError(f"--smooth: only the quantized variants ({', '.join(smoothed)}) are smoothed, not {variant}")
    if smooth and calibration is None:
        raise ConfigError("--smooth needs --calibration FILE (rows the model will see, e.g. the training data)")
    return load_calibration(calibration, tokenizer) if wanted and calibration is not None else None


def check_variant_options(variant: str, activation_bits: int, eight_bit: Sequence[str] = ()) -> None:
    """``--activation-bits`` other than 8 is for the variants computed by int8 kernels (int8, int4);
    ``--eight-bit`` is for int4 and takes regular expressions (``quantize.variant_settings`` refuses the rest)."""
    variant_settings(variant, activation_bits, eight_bit)  # refuses a value outside quantize.ACTIVATION_BITS
    if activation_bits != 8 and variant_settings(variant) is None:
        raise ConfigError(f"--activation-bits {activation_bits}: only int8 and int4 compute on 8-bit activations, not {variant}")


def calibration_plan(calibration: Path | None, tokenizer: Any, variant: str, smooth: bool | None,
                     gptq: bool | None, activation_bits: int = 8) -> tuple[Calibration | None, bool, bool]:
    """The calibration rows the variant needs, whether it is smoothed and whether GPTQ rounds it
    (``None``: the tables ``SMOOTHED_VARIANTS`` / ``GPTQ_VARIANTS`` decide when rows are given); unusable rows
    or flags are refused before any work."""
    calib = smoothing_calibration(calibration, tokenizer, variant, smooth)
    if gptq and variant not in GPTQ_VARIANTS:
        raise ConfigError(f"--gptq: only the quantized variants ({', '.join(GPTQ_VARIANTS)}) take it, not {variant}")
    if gptq and calibration is None:
        raise ConfigError("--gptq needs --calibration FILE (rows the model will see, e.g. the training data)")
    rounds = calibration is not None and (GPTQ_VARIANTS.get(variant, False) if gptq is None else gptq)
    quant = variant_settings(variant, activation_bits)
    if calib is None and calibration is not None and (rounds or (quant and quant.float_massive_inputs)):
        return load_calibration(calibration, tokenizer), False, rounds
    return calib, calib is not None, rounds


def write_variant(model: Any, model_dir: Path, tmp: Path, variant: str,
                   progress: Progress, calibration: Calibration | None = None, *, smooth: bool = True,
                   forced_smoothing: bool = False, gptq: bool = False,
                   refs: Sequence[Reference] = (), activation_bits: int = 8,
                   eight_bit: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
    """Export fp32 (into ``tmp``, or a work folder inside it) and derive ``variant``; (fp32 bytes, settings).
    With ``calibration`` the outlier smoothing (when ``smooth``) and GPTQ (when ``gptq``) are folded into
    ``model`` first (the reference was taken before). The layers that read massive activations are
    measured on the calibration rows, or else on the reference's sample texts (``refs``), for the
    variants that compute them on float activations (``float_massive_inputs``). ``eight_bit``: int4's extra
    8-bit modules (``--eight-bit``)."""
    smoothing, rounded, gptq_info = None, None, None
    if calibration is not None and smooth:
        rows = min(calibration.rows, SMOOTHING_ROWS)
        with progress.stage("smooth", f"smoothing outlier activations (first {rows} calibration rows)"):
            smoothing = smooth_model(model, calibration, forced=forced_smoothing)
    if gptq and calibration is not None:
        t0 = time.perf_counter()  # GPTQ shows its own progress bar, not a stage spinner
        rounded, gptq_info = round_model(model, variant, calibration, eight_bit)
        progress.timings["gptq_s"] = round(time.perf_counter() - t0, 2)
    massive = None
    quant = variant_settings(variant, activation_bits)
    if quant is not None and quant.float_massive_inputs:
        with progress.stage("massive", "finding the layers that read massive activations"):
            massive = (massive_inputs(model, calibration.sequences, "calibration rows") if calibration is not None
                       else massive_inputs(model, [r.prompt for r in refs], "sample texts"))
    fp32_dir = tmp if variant == "fp32" else tmp / _FP32_WORK_DIR
    with progress.stage("export", "exporting fp32 ONNX with KV cache (optimum)"):
        export_fp32(model, model_dir, fp32_dir)
    fp32_bytes = onnx_size(fp32_dir)
    if variant == "fp32":
        return fp32_bytes, {}
    with progress.stage("convert", f"converting to {variant}"):
        settings = make_variant(fp32_dir, tmp, variant, gptq=rounded is not None,
                                float_modules=tuple(massive.layers) if massive else (), activation_bits=activation_bits,
                                eight_bit=eight_bit)
    shutil.rmtree(fp32_dir)  # only the variant ships
    if massive is not None:
        settings["massive_inputs"] = massive.record(settings.pop("float_activation_nodes", []))
    if smoothing is not None:
        settings["smoothing"] = smoothing
    if rounded is not None:  # onnxruntime must have stored GPTQ's values, not rounded them again
        settings["gptq"] = {**gptq_info, "tensors_not_reproduced": not_reproduced(tmp, rounded)}
    return fp32_bytes, settings


@dataclass
class WrittenVariant:
    """A variant written into the temporary output directory, with the reference it is verified against."""

    tmp: Path
    refs: list[Reference]
    fp32_bytes: int
    quantizer: dict[str, Any]


@contextlib.contextmanager
def written_variant(model_dir: Path, output: Path, variant: str, tokenizer: Any, progress: Progress, *,
                    overwrite: bool, calibration: Path | None = None,
                    smooth: bool | None = None, gptq: bool | None = None,
                    activation_bits: int = 8, eight_bit: Sequence[str] = ()) -> Iterator[WrittenVariant]:
    """Reference, then ``variant`` written into ``output``'s temporary directory (renamed into place on exit),
    the PyTorch weights freed before the caller verifies: the shared start of the formats built on this export.
    ``calibration``/``smooth``/``gptq``/``activation_bits``/``eight_bit``: as for ``export_onnx`` (unusable rows
    or flags are refused before any work)."""
    check_variant_options(variant, activation_bits, eight_bit)
    check_eight_bit(model_dir, eight_bit)
    calib, smoothed, rounds = calibration_plan(calibration, tokenizer, variant, smooth, gptq, activation_bits)
    with quiet():
        model, refs = load_reference(model_dir, tokenizer, progress)
        with atomic_dir(output, overwrite=overwrite) as tmp:
            fp32_bytes, quantizer = write_variant(model, model_dir, tmp, variant, progress, calib, smooth=smoothed,
                                                  forced_smoothing=smooth is True, gptq=rounds, refs=refs,
                                                  activation_bits=activation_bits, eight_bit=tuple(eight_bit))
            del model
            gc.collect()
            yield WrittenVariant(tmp, refs, fp32_bytes, quantizer)
