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
- ``int4``: MatMulNBits 4-bit blocks of 32 from the HQQ quantizer, whose float zero points are split
  into uint4 zero points plus a per-block offset MatMul (``split_float_zero_points``) so the fast
  kernels apply; logits projection 8-bit, embedding fp16: 0.974 / 0.004; 158 MiB, 35 ms.
  Caveat: these weights were dequantized from a Q4_1 GGUF and HQQ recovers that grid. With a
  rank-8 delta of 5% of each weight's norm added (a LoRA merge), int4 measures 0.82 / 0.15 (fails its
  bar; int8 stays at 0.96 / 0.006). Round-to-nearest 4-bit (symmetric or not, blocks 16-64,
  k-quant search) measured 0.66-0.71 / 0.38-0.47 on the default weights; HQQ with its float zero
  points kept is as accurate as the split form but ~6x slower than fp32 on CPU.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeft.core.errors import ConfigError, EdgeftError, one_line
from export.onnx.graph import embedding_to_fp16, lm_head_node, split_float_zero_points, untie_lm_head
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
    lm_head_bits: int | None = 8  # logits projection (untied from the embedding to quantize it), None = float
    embedding: str = "fp16"  # embedding table: "fp16" (exact enough, half size) or "fp32"
    per_channel: bool = True  # dynamic only: one scale per output column
    reduce_range: bool = False  # dynamic only: 7-bit weights, for CPUs without VNNI


@dataclass(frozen=True)
class Int4Settings:
    """4-bit variant. Defaults chosen by measurement on SmolLM2-135M (module docstring)."""

    # "hqq": MatMulNBitsQuantizer's HQQ (data-free, float zero points), whose float zero points are
    # then split into uint4 zero points plus a per-block offset so MLAS's fast kernels run it.
    # "rtn": the DEFAULT round-to-nearest quantizer (integer zero points): top-1 0.67 on SmolLM2-135M.
    algorithm: str = "hqq"
    block_size: int = 32  # weights per scale along the input dimension
    symmetric: bool = False  # rtn only
    accuracy_level: int | None = 4  # int8 compute in MLAS: several times faster decode on x86
    lm_head_bits: int | None = 8  # logits projection at 8 bits: 4 bits there costs the most agreement
    embedding: str = "fp16"  # "fp16", "fp32" or "int4" (GatherBlockQuantized; KL x5 on SmolLM2-135M)


# Variants that can take the outlier smoothing (export/smoothing.py) -> whether they do by default when
# calibration rows are given (``--smooth`` forces it). int8, measured on two QLoRA fine-tunes of
# SmolLM2-135M: SST-2 (100 dev rows) top-1 0.921 -> 0.944, mean KL 0.024 -> 0.015; the demo's task
# (64 eval rows) top-1 0.982 -> 0.954, KL 0.0138 -> 0.0129. KL fell on both, top-1 rose on one and fell
# on the other, so it stays opt-in.
SMOOTHED_VARIANTS = {"int8": False, "int4": False}

INT8 = Int8Settings()
INT4 = Int4Settings()


def make_variant(fp32_dir: Path, dest: Path, variant: str) -> dict[str, Any]:
    """Write ``variant`` of ``fp32_dir/model.onnx`` to ``dest``; move config/tokenizer there. Returns settings."""
    for p in fp32_dir.iterdir():  # config, generation config, tokenizer files
        if p.is_file() and not p.name.startswith(ONNX_NAME):
            shutil.move(str(p), dest / p.name)
    src = fp32_dir / ONNX_NAME
    if variant == "int8":
        return quantize_int8(src, dest / ONNX_NAME, INT8)
    if variant == "int4":
        return quantize_int4(src, dest / ONNX_NAME, INT4)
    return convert_fp16(src, dest / ONNX_NAME)


def quantize_int8(src: Path, dest: Path, settings: Int8Settings) -> dict[str, Any]:
    """8-bit weights: MatMulNBits blocks (default) or quantize_dynamic. Returns the settings used."""
    if settings.method == "dynamic":
        return _int8_dynamic(src, dest, settings)
    if settings.method != "weight_only":
        raise ConfigError(f"int8 method {settings.method!r}: expected weight_only or dynamic")
    return _weight_only(src, dest, bits=8, algorithm="rtn", block_size=settings.block_size,
                        symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
                        lm_head_bits=settings.lm_head_bits, embedding=settings.embedding) | {"int8": asdict(settings)}


def quantize_int4(src: Path, dest: Path, settings: Int4Settings) -> dict[str, Any]:
    """4-bit weight-only blocks (MatMulNBits). Returns the settings used."""
    if settings.algorithm not in ("hqq", "rtn"):
        raise ConfigError(f"int4 algorithm {settings.algorithm!r}: expected hqq or rtn")
    return _weight_only(src, dest, bits=4, algorithm=settings.algorithm, block_size=settings.block_size,
                        symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
                        lm_head_bits=settings.lm_head_bits, embedding=settings.embedding) | {"int4": asdict(settings)}


def _weight_only(src: Path, dest: Path, *, bits: int, algorithm: str, block_size: int, symmetric: bool,
                 accuracy_level: int | None, lm_head_bits: int | None, embedding: str) -> dict[str, Any]:
    """MatMulNBitsQuantizer passes: transformer MatMuls at ``bits``, then the logits projection, then the embedding."""
    import onnx

    try:  # onnxruntime's quantizer imports onnx_ir, which onnxruntime does not declare as a dependency
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer
    except ImportError as e:
        raise EdgeftError(f"int{bits} export needs onnxruntime's quantizer ({one_line(e)}); run `pip install onnx-ir`") from None

    def rtn(model: Any, n_bits: int, **nodes: Any) -> Any:
        q = MatMulNBitsQuantizer(model, bits=n_bits, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",), **nodes)
        q.process()
        return q.model.model

    try:
        model = onnx.load(str(src))
        lm_head = untie_lm_head(model) if lm_head_bits else lm_head_node(model)
        skip = [lm_head] if lm_head else []
        if algorithm == "hqq":
            config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",))
            q = MatMulNBitsQuantizer(model, nodes_to_exclude=skip, algo_config=config)
            q.process()
            model = q.model.model
            split_float_zero_points(model, accuracy_level)
        else:
            model = rtn(model, bits, nodes_to_exclude=skip)
        if lm_head_bits and lm_head:
            # After the first pass the only float MatMul with a constant weight left is the logits projection.
            model = rtn(model, lm_head_bits, nodes_to_include=[lm_head])
        if embedding == "int4":
            q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                     op_types_to_quantize=("Gather",))
            q.process()
            model = q.model.model
        elif embedding == "fp16":
            embedding_to_fp16(model)
        save_onnx(model, dest)
    except (EdgeftError, MemoryError):
        raise
    except Exception as e:
        raise EdgeftError(f"int{bits} quantization failed: {one_line(e)}") from None
    how = "HQQ, float zero points split" if algorithm == "hqq" else "DEFAULT, round to nearest"
    return {"method": f"onnxruntime MatMulNBitsQuantizer ({how})", "bits": bits, "algorithm": algorithm,
            "block_size": block_size, "symmetric": symmetric if algorithm == "rtn" else None,
            "accuracy_level": accuracy_level, "lm_head_node": lm_head, "lm_head_bits": lm_head_bits,
            "embedding": embedding}


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
