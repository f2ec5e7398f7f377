"""Derive the fp16, int8 and int4 variants from the fp32 graph (onnxruntime's quantizers plus the edits
in ``graph.py``), with the settings each variant uses.

Variants, settings chosen by measurement on SmolLM2-135M-Instruct (2 shared CPU cores, onnxruntime
1.32). Figures: top-1 agreement / mean KL against PyTorch fp32 on the verification samples (231
positions; a 525-position sweep agrees within 0.01), and decode time per token at 40 tokens of context:
- ``fp32``: optimum's export as is: 1.00 / 1e-11, max |logit diff| 1e-4 (bar 1e-3); 514 MiB, 75 ms.
- ``fp16``: ``onnxruntime.transformers.float16``, float32 inputs/outputs kept. Runs on the CPU
  provider but no faster there: 1.00 / 5e-6; 258 MiB, 75 ms.
- ``int8``: MatMulNBits 8-bit symmetric blocks of 32 (``MatMulNBitsQuantizer``), int8 compute
  (accuracy_level 4), logits projection 8-bit, embedding fp16: 0.957 / 0.005; 200 MiB, 36 ms.
  ``quantize_dynamic`` (``Int8Settings(method="dynamic")``) measured 0.56 / 0.74 (0.82 / 0.10 with
  every down_proj left float): one activation scale per tensor cannot hold SmolLM2's first-token
  activations (~3000 against a median of ~2). Weight-only at accuracy_level 0: 0.96 / 0.002 but
  7-10x slower decode than fp32.
- ``int8``, the MatMuls that read massive activations (``export/massive_inputs.py``: an input channel
  300x its median; SmolLM2's down_proj in layers 11 and 28, none in Gemma 3 270M) at accuracy_level 0,
  float activations on their 8-bit weights (``float_massive_inputs``). SmolLM2 SST-2 fine-tune, the
  export's own verification on 256 dev rows (``--calibration`` the training rows;
  benchmarks/QUANTIZATION.md, "Massive activations on float activations"): top-1 / mean KL 0.944 / 0.0082
  -> 0.968 / 0.0080; all 872 dev rows against the unmerged model (edgeft bench) 0.9446 -> 0.9671; the
  demo's fine-tune (``make demo``'s bench) 0.9856 -> 0.9873. int4 is left with int8 activations everywhere: its loss is in the 4-bit weights, and a
  trial outside the repository's commands showed no gain there.
- ``int8 --activation-bits 16`` (``two_pass_activations`` in ``graph.py``): every int8-compute MatMul takes
  its input as the kernel's own 8-bit rounding plus the remainder, two rows of one call, so about 16 bits
  reach the dot products; same weights and size. SmolLM2 SST-2 fine-tune, the export's own verification
  on 256 dev rows (7279 distinct contexts): top-1 / mean KL 0.9511 / 0.0063 (default) -> 0.9661 / 0.0030;
  with ``--smooth --gptq`` 0.9783 / 0.0012 (all 872 dev rows against the unmerged model: 0.9775 / 0.0012,
  task +0.1 points). Decode 53.3 -> 38.1 tok/s, time to first token 58 -> 171 ms (edgeft bench, one run; the
  default folder against the same rewrite applied to it, whose figures equal the 16-bit export's).
  The massive-input MatMuls split the same way gave the same figures as on float activations, and ran faster
  (38.1 against 34.4 tok/s), so ``float_massive_inputs`` is off at 16 bits. Gemma 3 270M (base, 48 rows,
  no calibration): 0.9181 / 0.0167, failing its bars -> 0.9656 / 0.0019. Opt-in: it trades speed (a failed
  int8/int4 verification prints the hint).
- ``int4``: MatMulNBits 4-bit blocks of 32 from the HQQ quantizer, whose float zero points are split
  into uint4 zero points plus a per-block offset MatMul (``split_float_zero_points``) so the fast kernels
  apply; every ``down_proj`` and ``v_proj`` at 8 bits (as llama.cpp's q4_k_m keeps ffn_down and attn_v at
  a higher type), int8 compute, logits projection 8-bit, embedding fp16. Chosen on two fine-tunes, on
  their dev rows (top-1 / mean KL against the merged model; ``benchmarks/onnx_int4.py``,
  benchmarks/QUANTIZATION.md):
  keeping down_proj and v_proj at 8 bits helped both 4-bit quantizers on both models; with them HQQ led
  k-quant on Gemma 3 270M (0.74 / 0.26 against 0.60 / 0.48) and on SmolLM2-135M's top-1 (0.79 against
  0.78; KL 0.34 against 0.26). All 4-bit alone: 0.63 / 0.92 (HQQ) and 0.70 / 0.62 (k-quant) on SmolLM2.
  Both bases were dequantized from GGUF files (Q4_1, Q4_K_M), a grid HQQ recovers; a model trained in
  16 bits may rank them differently. onnxruntime's GPTQ (``benchmarks/onnx_int4.py --recipes gptq``;
  not run in that form) ranked below k-quant in a trial and is not used. Every ``k_proj`` joined them
  later (below).
- ``int4`` with calibration rows (``--calibration``, the training data; the pipeline passes them): GPTQ
  (``export/onnx/gptq.py``, inputs in act-order) rounds the decoder's weights onto symmetric 4-bit blocks of
  32 (the ``higher_precision`` ones onto 8-bit blocks) on the user's rows, and onnxruntime's round to
  nearest stores them unchanged (``INT4_AFTER_GPTQ``; checked on the written graph). SmolLM2 SST-2
  fine-tune, 256 dev rows against the merged model: top-1 0.791 -> 0.899, mean KL 0.173 -> 0.056
  (``GPTQ_VARIANTS``); with k_proj at 8 bits too, 0.910 / 0.047 (passes the int4 bars) for 1.6 MiB more.
  Those figures count the task's instruction once per row; scored with each context once (README "Each
  context counted once") the same export verifies at 0.858 / 0.065 and fails the int4 bars, with task
  accuracy 0.883 against the reference's 0.879.
- Which projections stay at 8 bits (``benchmarks/int4_precision_plan.py``: GPTQ onto both grids, each
  plan compared in PyTorch on the dev rows; benchmarks/QUANTIZATION.md): on top of down_proj + v_proj,
  k_proj cut mean KL by a third on the SmolLM2 fine-tune for 1.5 MiB (q_proj, o_proj by 5-6% for 5 MiB;
  gate_proj, up_proj by 13% and 25% for 13 MiB), and by 4% on Gemma 3 270M for 1.4 MiB (gate_proj,
  up_proj: about a third for 11 MiB). k_proj is the cheapest projection that helps on both (grouped-query
  attention: every key head serves several query heads), so it joined the default. up_proj on top of the
  default (``--eight-bit up_proj``) exports at 0.892 / 0.037 on the SST-2 fine-tune's 256 rows, each
  context once (default 0.858 / 0.065), still under the top-1 bar, for 7.7% more file: the user's choice.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from edgeft.core.errors import ConfigError, EdgeftError, one_line
from export.onnx.graph import (compute_in_float, embedding_to_fp16, lm_head_node, module_of, split_float_zero_points,
                               two_pass_activations, untie_lm_head)
from export.onnx.write import ONNX_NAME, save_onnx


@dataclass(frozen=True)
class Int8Settings:
    """8-bit variant. Defaults chosen by measurement on SmolLM2-135M (module docstring)."""

    # "weight_only": MatMulNBits 8-bit blocks, activations stay float (int8 dot products at
    # accuracy_level 4). "dynamic": quantize_dynamic (MatMulInteger, activations quantized per tensor
    # per call): top-1 0.56 on SmolLM2-135M, whose first-token activations reach 3000.
    method: str = "weight_only"
    block_size: int = 32  # weight_only: weights per scale along the input dimension
    symmetric: bool = True  # weight_only: no zero point
    accuracy_level: int | None = 4  # weight_only: int8 compute in MLAS; several times faster decode on x86
    lm_head_bits: int | None = 8  # logits projection (untied from the embedding to quantize it): 8 bits, or None = float
    embedding: str = "fp16"  # embedding table: "fp16" (exact enough, half size) or "fp32"
    # weight_only: the MatMuls whose input carries massive activations (export/massive_inputs.py) compute on
    # float activations, their weights still 8-bit (module docstring)
    float_massive_inputs: bool = True
    # weight_only: 8 = MLAS rounds each input row onto 8-bit blocks (the int8 kernels as they are); 16 = the input
    # split into that rounding plus its remainder, run as two rows of one call (``two_pass_activations``): the
    # massive-input MatMuls need no float path then (module docstring)
    activation_bits: int = 8
    per_channel: bool = True  # dynamic only: one scale per output column
    reduce_range: bool = False  # dynamic only: 7-bit weights, for CPUs without VNNI


@dataclass(frozen=True)
class Int4Settings:
    """4-bit variant. Defaults chosen by measurement on two fine-tunes (module docstring)."""

    # "hqq": HQQ (data-free), whose float zero points are split into uint4 zero points plus a per-block
    # offset MatMul (``split_float_zero_points``) so MLAS's fast kernels run it. "k_quant": onnxruntime's
    # k-quant search (integer zero points). "rtn": round to nearest (the DEFAULT quantizer).
    algorithm: str = "hqq"
    block_size: int = 32  # weights per scale along the input dimension
    symmetric: bool = False  # rtn only
    accuracy_level: int | None = 4  # int8 compute in MLAS: several times faster decode on x86
    # MatMuls whose node name contains one of these stay at 8 bits (llama.cpp's q4_k_m keeps ffn_down and
    # attn_v higher too): mean KL 0.92 -> 0.34 on the SmolLM2 SST-2 fine-tune for 8% more bytes (HQQ);
    # k_proj too: GPTQ's KL 0.056 -> 0.047 there for 1% more (module docstring). Each entry is a regular
    # expression searched in the PyTorch module name (``higher_precision``); ``--eight-bit`` adds more.
    higher_precision: tuple[str, ...] = ("down_proj", "v_proj", "k_proj")
    lm_head_bits: int | None = 8  # logits projection at 8 bits: 4 bits there costs the most agreement
    embedding: str = "fp16"  # "fp16", "fp32" or "int4" (GatherBlockQuantized; KL x5 on SmolLM2-135M)
    float_massive_inputs: bool = False  # as for int8; no gain at 4 bits (module docstring)
    activation_bits: int = 8  # as for int8


INT4_ALGORITHMS = ("k_quant", "rtn", "hqq")
ACTIVATION_BITS = (8, 16)  # --activation-bits
EIGHT_BIT_BLOCK = 32  # the 8-bit pass of int4 (logits projection, higher-precision MatMuls): symmetric blocks


# Variants that can take the outlier smoothing (export/smoothing.py) -> whether they do by default when
# calibration rows are given (``--smooth`` forces it). int8, measured on two QLoRA fine-tunes of
# SmolLM2-135M: SST-2 (100 dev rows) top-1 0.921 -> 0.944, mean KL 0.024 -> 0.015; the demo's task
# (64 eval rows) top-1 0.982 -> 0.954, KL 0.0138 -> 0.0129. KL fell on both, top-1 rose on one and fell
# on the other, so it stays opt-in. int4 (HQQ, down_proj/v_proj 8-bit), the same SST-2 fine-tune and rows,
# `edgeft export onnx --quantize int4 --smooth/--no-smooth --calibration TRAIN --eval-data DEV`: top-1 0.791 ->
# 0.787, KL 0.343 -> 0.423 smoothed, so it stays opt-in too.
SMOOTHED_VARIANTS = {"int8": False, "int4": False}
# Variants that can take GPTQ onto their grids (export/onnx/gptq.py) -> whether they do by default when
# calibration rows are given (``--gptq``/``--no-gptq`` force it). int4, SmolLM2 SST-2 fine-tune, 256 dev
# rows, against HQQ: top-1 0.791 -> 0.899, mean KL 0.173 -> 0.056, task accuracy 0.859 -> 0.891 (reference
# 0.879), 6 MiB smaller; benchmarks/QUANTIZATION.md "GPTQ onto onnxruntime's grids" has these and the
# second model's figures.
# int8 (top-1 / mean KL, plain -> GPTQ): SST-2 fine-tune 0.944 / 0.0082 -> 0.966 / 0.0065, but the demo's
# fine-tune 0.982 / 0.0137 -> 0.928 / 0.0133 and Gemma 3 270M 0.931 / 0.0162 -> 0.927 / 0.0117: KL fell on all
# three, top-1 rose on one only (benchmarks/QUANTIZATION.md "Why int8 keeps GPTQ opt-in"); ``--quantize auto``
# tries both.
GPTQ_VARIANTS = {"int8": False, "int4": True}

INT8 = Int8Settings()
INT4 = Int4Settings()


# After GPTQ (export/onnx/gptq.py) the weights already lie on symmetric grids: onnxruntime's round to
# nearest stores them unchanged (HQQ's or k-quant's search would move them again).
INT4_AFTER_GPTQ = replace(INT4, algorithm="rtn", symmetric=True)


def variant_settings(variant: str, activation_bits: int = 8,
                     eight_bit: Sequence[str] = ()) -> Int8Settings | Int4Settings | None:
    """The quantized variant's settings (None for fp32/fp16), with ``activation_bits`` (``--activation-bits``;
    at 16 no MatMul needs float activations, so ``float_massive_inputs`` is off) and, for int4, the
    ``eight_bit`` patterns (``--eight-bit``) added to ``higher_precision``."""
    settings = {"int8": INT8, "int4": INT4}.get(variant)
    if activation_bits not in ACTIVATION_BITS:
        raise ConfigError(f"--activation-bits {activation_bits}: expected one of {', '.join(map(str, ACTIVATION_BITS))}")
    if eight_bit:
        if not isinstance(settings, Int4Settings):
            raise ConfigError(f"--eight-bit: only int4 keeps some MatMuls at 8 bits, not {variant}")
        for pattern in eight_bit:
            check_pattern(pattern)
        settings = replace(settings, higher_precision=settings.higher_precision + tuple(eight_bit))
    if settings is None or activation_bits == settings.activation_bits:
        return settings
    return replace(settings, activation_bits=activation_bits, float_massive_inputs=False)


def check_pattern(pattern: str) -> None:
    """An ``--eight-bit`` pattern must be a regular expression (searched in PyTorch module names)."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--eight-bit {pattern!r}: not a regular expression ({e})") from None


def higher_precision(module: str, patterns: Sequence[str]) -> bool:
    """Whether PyTorch module ``module`` (``model.layers.3.mlp.up_proj``) stays at 8 bits in int4: one of
    ``patterns`` (``Int4Settings.higher_precision``) is found in it."""
    return any(re.search(p, module) for p in patterns)


def make_variant(fp32_dir: Path, dest: Path, variant: str, gptq: bool = False,
                 float_modules: Sequence[str] = (), activation_bits: int = 8,
                 eight_bit: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``variant`` of ``fp32_dir/model.onnx`` to ``dest``; move config/tokenizer there. Returns settings.
    ``gptq``: the weights were rounded onto the variant's symmetric grids (int4 then takes round to nearest).
    ``float_modules``: PyTorch modules whose MatMuls compute on float activations (``float_massive_inputs``).
    ``activation_bits``: 8 or 16; ``eight_bit``: int4's extra 8-bit patterns (``variant_settings``)."""
    for p in fp32_dir.iterdir():  # config, generation config, tokenizer files
        if p.is_file() and not p.name.startswith(ONNX_NAME):
            shutil.move(str(p), dest / p.name)
    src = fp32_dir / ONNX_NAME
    settings = variant_settings(variant, activation_bits, eight_bit)
    if isinstance(settings, Int8Settings):
        return quantize_int8(src, dest / ONNX_NAME, settings, float_modules)
    if isinstance(settings, Int4Settings):
        if gptq:
            settings = replace(settings, algorithm=INT4_AFTER_GPTQ.algorithm, symmetric=INT4_AFTER_GPTQ.symmetric)
        return quantize_int4(src, dest / ONNX_NAME, settings, float_modules)
    return convert_fp16(src, dest / ONNX_NAME)


def quantize_int8(src: Path, dest: Path, settings: Int8Settings, float_modules: Sequence[str] = ()) -> dict[str, Any]:
    """8-bit weights: MatMulNBits blocks (default) or quantize_dynamic. Returns the settings used."""
    if settings.method == "dynamic":
        return _int8_dynamic(src, dest, settings)
    if settings.method != "weight_only":
        raise ConfigError(f"int8 method {settings.method!r}: expected weight_only or dynamic")
    return _weight_only(src, dest, bits=8, settings=settings, float_modules=float_modules) | {"int8": asdict(settings)}


def quantize_int4(src: Path, dest: Path, settings: Int4Settings, float_modules: Sequence[str] = ()) -> dict[str, Any]:
    """4-bit weight-only blocks (MatMulNBits), the higher-precision MatMuls at 8 bits. Returns the settings used."""
    if settings.algorithm not in INT4_ALGORITHMS:
        raise ConfigError(f"int4 algorithm {settings.algorithm!r}: expected one of {', '.join(INT4_ALGORITHMS)}")
    return _weight_only(src, dest, bits=4, settings=settings, float_modules=float_modules) | {"int4": asdict(settings)}


def _weight_only(src: Path, dest: Path, *, bits: int, settings: Int8Settings | Int4Settings,
                 float_modules: Sequence[str] = ()) -> dict[str, Any]:
    """MatMulNBitsQuantizer passes: transformer MatMuls at ``bits``; then, at 8 bits, the logits projection
    and every MatMul the first pass left (``higher_precision``); then the embedding; then the MatMuls of
    ``float_modules`` (chosen by the caller where ``float_massive_inputs`` says so) set to float activations."""
    import onnx

    try:  # onnxruntime's quantizer imports onnx_ir, which onnxruntime does not declare as a dependency
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:
        raise EdgeftError(f"int{bits} export needs onnxruntime's quantizer ({one_line(e)}); run `pip install onnx-ir`") from None
    algorithm = getattr(settings, "algorithm", "rtn")
    try:
        model = onnx.load(str(src))
        lm_head = untie_lm_head(model) if settings.lm_head_bits else lm_head_node(model)
        kept = [n.name for n in model.graph.node if n.op_type == "MatMul"
                and higher_precision(module_of(n.name), getattr(settings, "higher_precision", ()))]
        model = _first_pass(model, bits, algorithm, settings, exclude=kept + ([lm_head] if lm_head else []))
        if kept or (settings.lm_head_bits and lm_head):
            # Every MatMul with a constant weight still float: the logits projection unless it stays float,
            # the higher-precision ones (and HQQ's per-block offsets, measured no worse at 8 bits).
            model = run_quantizer(MatMulNBitsQuantizer(model, bits=8, block_size=EIGHT_BIT_BLOCK, is_symmetric=True,
                                              accuracy_level=settings.accuracy_level, op_types_to_quantize=("MatMul",),
                                              nodes_to_exclude=[] if settings.lm_head_bits or not lm_head else [lm_head]))
        if settings.embedding == "int4":
            model = run_quantizer(MatMulNBitsQuantizer(model, bits=4, block_size=settings.block_size,
                                              is_symmetric=settings.symmetric, op_types_to_quantize=("Gather",)))
        elif settings.embedding == "fp16":
            embedding_to_fp16(model)
        float_nodes = compute_in_float(model, float_modules)
        two_pass = two_pass_activations(model) if settings.activation_bits == 16 else []
        save_onnx(model, dest)
    except (EdgeftError, MemoryError):
        raise
    except Exception as e:
        raise EdgeftError(f"int{bits} quantization failed: {one_line(e)}") from None
    how = {"hqq": "HQQ, float zero points split", "k_quant": "k-quant search"}.get(algorithm, "DEFAULT, round to nearest")
    return {"method": f"onnxruntime MatMulNBitsQuantizer ({how})", "bits": bits, "algorithm": algorithm,
            "block_size": settings.block_size, "symmetric": settings.symmetric if algorithm == "rtn" else None,
            "accuracy_level": settings.accuracy_level, "lm_head_node": lm_head, "lm_head_bits": settings.lm_head_bits,
            "eight_bit_nodes": len(kept), "embedding": settings.embedding, "float_activation_nodes": float_nodes,
            "activation_bits": settings.activation_bits, "two_pass_nodes": len(two_pass)}


def _first_pass(model: Any, bits: int, algorithm: str, settings: Int8Settings | Int4Settings, exclude: list[str]) -> Any:
    """The transformer MatMuls (all but ``exclude``) at ``bits`` with ``algorithm``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (HQQWeightOnlyQuantConfig, KQuantWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    common = {"bits": bits, "block_size": settings.block_size, "accuracy_level": settings.accuracy_level,
              "nodes_to_exclude": exclude}
    if algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=settings.block_size, bits=bits, op_types_to_quantize=("MatMul",))
        model = run_quantizer(MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config))
        split_float_zero_points(model, settings.accuracy_level)
        return model
    if algorithm == "k_quant":
        config = KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
        return run_quantizer(MatMulNBitsQuantizer(model, is_symmetric=False, algo_config=config, **common))
    return run_quantizer(MatMulNBitsQuantizer(model, is_symmetric=settings.symmetric, op_types_to_quantize=("MatMul",), **common))


def run_quantizer(quantizer: Any) -> Any:
    """Run an onnxruntime weight quantizer; its model as a ModelProto (the k-quant path wraps it once more)."""
    from onnx import ModelProto

    quantizer.process()
    model = quantizer.model
    while not isinstance(model, ModelProto):
        model = model.model
    return model


def _int8_dynamic(src: Path, dest: Path, settings: Int8Settings) -> dict[str, Any]:
    """quantize_dynamic: int8 weights, uint8 activations quantized per tensor on every call."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    work = dest.parent / ".int8-work"
    work.mkdir(exist_ok=True)
    model = onnx.load(str(src))
    lm_head = untie_lm_head(model) if settings.lm_head_bits else lm_head_node(model)
    exclude = [lm_head] if lm_head and not settings.lm_head_bits else []
    ops = ["MatMul"]
    if settings.embedding == "fp16":
        embedding_to_fp16(model)
    save_onnx(model, work / ONNX_NAME)
    del model
    try:
        quantize_dynamic(work / ONNX_NAME, work / "q.onnx", op_types_to_quantize=ops, per_channel=settings.per_channel,
                         reduce_range=settings.reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                         use_external_data_format=True)  # any size; save_onnx decides the final layout
        save_onnx(onnx.load(str(work / "q.onnx")), dest)
    except Exception as e:
        raise EdgeftError(f"int8 quantization failed: {one_line(e)}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"method": "onnxruntime.quantization.quantize_dynamic", "bits": 8, "weight_type": "QInt8",
            "excluded_nodes": exclude, "int8": asdict(settings)}


def convert_fp16(src: Path, dest: Path) -> dict[str, Any]:
    """fp16 weights and compute; inputs/outputs stay float32 so the interface matches fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        save_onnx(model, dest)
    except Exception as e:
        raise EdgeftError(f"fp16 conversion failed: {one_line(e)}") from None
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True}
