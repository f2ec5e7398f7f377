"""GPTQ onto onnxruntime's symmetric MatMulNBits grids (``--gptq``; the rounding is ``export/gptq.py``).

The decoder's linear layers are rounded, on the calibration rows, onto the grid each one gets in the
variant: 8-bit blocks of 32 for int8; for int4, 4-bit blocks for most and 8-bit blocks for the
higher-precision ones (``Int4Settings.higher_precision``). The rounded weights go into the PyTorch
model before the fp32 export, and onnxruntime's own round-to-nearest quantizer (symmetric) then stores
them unchanged: ``not_reproduced`` decodes every MatMulNBits weight of the written graph and compares it
with GPTQ's values. The logits projection and the embedding keep their plain quantization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from export.calibration import Calibration
from export.gptq import Grid, decoder_linears, gptq_weights, ort_symmetric
from export.onnx.graph import module_of
from export.onnx.quantize import EIGHT_BIT_BLOCK, INT4_AFTER_GPTQ, INT8, higher_precision
from export.onnx.write import ONNX_NAME

# Round each layer's inputs in order of falling Hessian diagonal (export/gptq.py). SmolLM2 SST-2 fine-tune,
# int4, 256 dev rows (benchmarks/QUANTIZATION.md, "GPTQ onto onnxruntime's grids"; down_proj, v_proj at
# 8 bits): top-1 0.889 -> 0.899, mean KL 0.078 -> 0.056.
ACT_ORDER = True


def round_model(model: Any, variant: str, calibration: Calibration,
                eight_bit: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """GPTQ on ``calibration`` for the decoder's linear layers of ``model``, written into it in place;
    returns GPTQ's weights (``module.weight`` -> tensor, for ``not_reproduced``) and the record's figures.
    ``eight_bit``: int4's ``--eight-bit`` patterns (those modules go onto the 8-bit grid too)."""
    import torch

    grids = onnx_grids(model, variant, eight_bit)
    rounded, info = gptq_weights(model, calibration, grids, f"{variant}'s grid", ACT_ORDER)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in rounded.items():
            params[name].copy_(value.to(params[name].dtype))
    return rounded, info


def onnx_grids(model: Any, variant: str, eight_bit: tuple[str, ...] = ()) -> dict[str, Grid]:
    """Decoder linear module name -> the grid the variant's quantizer puts it on (``quantize.INT8``, or
    ``quantize.INT4_AFTER_GPTQ`` with its higher-precision MatMuls, and those ``eight_bit`` names, on the
    8-bit pass's blocks)."""
    if variant == "int8":
        eight = ort_symmetric(8, INT8.block_size)
        return {n: eight for n in decoder_linears(model, INT8.block_size)}
    eight, four = ort_symmetric(8, EIGHT_BIT_BLOCK), ort_symmetric(4, INT4_AFTER_GPTQ.block_size)
    names = set(decoder_linears(model, EIGHT_BIT_BLOCK)) & set(decoder_linears(model, INT4_AFTER_GPTQ.block_size))
    kept = INT4_AFTER_GPTQ.higher_precision + tuple(eight_bit)
    return {n: eight if higher_precision(n, kept) else four for n in sorted(names)}


def not_reproduced(onnx_path: Path, rounded: dict[str, Any]) -> list[str]:
    """The modules among ``rounded`` whose MatMulNBits weights in ``onnx_path`` (a graph file, or the folder
    holding ``model.onnx``; decoded: codes x scales) differ from GPTQ's values, or that have no such node
    (empty: onnxruntime stored them as rounded)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path / ONNX_NAME if onnx_path.is_dir() else onnx_path))
    inits = {t.name: t for t in model.graph.initializer}
    decoded: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) > 3:  # symmetric nodes have no zero points
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        packed, scales = (numpy_helper.to_array(inits[node.input[i]]) for i in (1, 2))
        decoded[module_of(node.name)] = _dequantize(packed, scales, attrs["bits"], attrs["K"], attrs["N"])
    bad = []
    for name, want in rounded.items():
        module = name[: -len(".weight")]
        got = decoded.get(module)
        if got is None or got.shape != tuple(want.shape) or not np.array_equal(got, want.numpy()):
            bad.append(module)
    return bad


def _dequantize(packed: np.ndarray, scales: np.ndarray, bits: int, k: int, n: int) -> np.ndarray:
    """A symmetric MatMulNBits weight as (N, K) float32: codes (zero point 2^(bits-1)) times block scales."""
    blocks = packed.shape[1]
    if bits == 4:
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, -1)
    else:
        codes = packed.reshape(n, blocks, -1)
    values = (codes.astype(np.float32) - 2 ** (bits - 1)) * scales.reshape(n, blocks, 1).astype(np.float32)
    return values.reshape(n, -1)[:, :k]
