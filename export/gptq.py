"""GPTQ onto a quantizer's block grid: the weights' share of the quantization loss, compensated on the
user's rows. Shared by the GGUF export (llama.cpp's q8_0, ``export/gguf/gptq.py``) and the ONNX export
(onnxruntime's symmetric MatMulNBits blocks, ``export/onnx/gptq.py``).

A block grid stores each run of ``block`` weights along a row (the layer's input dimension) as one scale
and integer codes in ``[lo, hi]``; the quantizer derives the scale from the block's largest weight and
rounds every weight to the nearest code. GPTQ (Frantar et al., 2022) rounds a linear layer's input columns
one at a time and spreads each column's rounding error over the columns not yet rounded, through the
inverse of H = mean x xᵀ over the calibration tokens, so the layer's *output* on the user's data moves
less than with round-to-nearest.

The result lies on the grid exactly: each block's scale is the one the quantizer will derive, and the
block's largest weight is pinned to the code that sets that scale, so the quantizer stores the values
unchanged (each exporter checks this on the file it writes). Hessians (each row's first position left out,
``SKIP_FIRST``) are held in float64 for a group of decoder layers at a time (``HESSIAN_BUDGET``), one pass
over the calibration rows per group, so memory stays bounded for larger models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from export.calibration import Calibration

DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (GPTQ's default)
HESSIAN_BUDGET = 2 << 30  # bytes of float64 Hessians held at once
# The first position of every row is left out of the Hessians: there most models put their
# attention sink, with activations hundreds of times the rest (SmolLM2: ~3000 against ~2), which would
# otherwise decide every weight's rounding for one token's sake. Measured on the SmolLM2 SST-2
# fine-tune (benchmarks/exact_transforms.py, 100 dev rows): q8_0 mean KL 0.00409 without GPTQ,
# 0.00318 with the first position in the Hessians, 0.00276 without it.
SKIP_FIRST = 1
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Grid:
    """A symmetric block grid: ``scale(extreme)`` is the (signed) scale the quantizer derives for a block
    whose largest-magnitude weight is ``extreme`` (float64 tensors, one per block); codes lie in [lo, hi]."""

    name: str
    block: int
    lo: int
    hi: int
    scale: Callable[[Any], Any]


def _q8_0_scale(extreme: Any) -> Any:
    """llama.cpp's q8_0: |extreme| / 127, stored in fp16."""
    return (extreme.abs() / 127).float().half().double()


Q8_0 = Grid("q8_0", 32, -127, 127, _q8_0_scale)


def ort_symmetric(bits: int, block: int) -> Grid:
    """onnxruntime's symmetric MatMulNBits blocks (MLAS): scale = extreme / -2^(bits-1) in float32, codes
    -2^(bits-1) .. 2^(bits-1) - 1 (the extreme at the lowest). The extreme is first cut to 16 significant
    bits, so that every code times the scale is exact in float32 and the quantizer reads back the same codes."""
    mid = 2 ** (bits - 1)

    def scale(extreme: Any) -> Any:
        return _short_mantissa(extreme) / -mid

    return Grid(f"int{bits} symmetric, blocks of {block}", block, -mid, mid - 1, scale)


def _short_mantissa(x: Any, bits: int = 16) -> Any:
    import torch

    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(mantissa * 2**bits) / 2**bits, exponent)


def round_onto_grid(weight: Any, hessian: Any, grid: Grid, act_order: bool = False) -> Any:
    """``weight`` (out, in) rounded onto ``grid`` by GPTQ under ``hessian`` (in, in); float64.

    ``act_order``: round the input columns in order of falling Hessian diagonal (the inputs that carry the
    most energy first, while the most columns are left to absorb their error). Each block's scale is then
    fixed from the block as given ("static groups"), since its columns are no longer rounded together."""
    import torch

    w = weight.detach().double().clone()
    n_out, n_in = w.shape
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # an input never seen: its weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMP * torch.diagonal(h).mean() * torch.eye(n_in, dtype=h.dtype)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(n_in)
    if act_order:
        static = _block_grid(w, grid)
        w, h = w[:, order], h[order][:, order]
    # upper Cholesky factor of H^-1: row i holds how column i's error spreads over the later columns
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for start in range(0, n_in, grid.block):
        end = min(start + grid.block, n_in)
        blk = w[:, start:end].clone()  # every earlier batch's error already applied
        if not act_order:  # this block's scale, from its weights as compensated so far
            scale, pinned, pin_code, zero = (t[:, 0] for t in _block_grid(blk, grid))
        errors = torch.empty_like(blk)
        for j in range(end - start):
            col = int(order[start + j])
            if act_order:
                b, pos = divmod(col, grid.block)
                scale, pinned, pin_code, zero = (t[:, b] for t in static)
            else:
                pos = j
            q = torch.clamp(torch.round(blk[:, j] / scale), grid.lo, grid.hi)
            pin = pinned == pos  # the block's largest weight sets its scale: it keeps the code that reproduces it
            q[pin] = pin_code[pin]
            q[zero] = 0
            out[:, start + j] = q * scale
            errors[:, j] = (blk[:, j] - out[:, start + j]) / hinv[start + j, start + j]
            blk[:, j + 1:] -= errors[:, j:j + 1] * hinv[start + j, start + j + 1:end][None, :]
        w[:, end:] -= errors @ hinv[start:end, end:]
    if act_order:
        out[:, order] = out.clone()
    return out


def _block_grid(w: Any, grid: Grid) -> tuple[Any, Any, Any, Any]:
    """Per row and block of ``w`` (out, in): the scale, the position of the largest weight, the code that
    weight keeps, and whether the block is stored as zeros; each (out, blocks). A zero block's scale reads 1."""
    import torch

    blocks = w.reshape(w.shape[0], -1, grid.block)
    pinned = blocks.abs().argmax(2)
    extreme = blocks.gather(2, pinned[..., None])[..., 0]
    scale = grid.scale(extreme)
    zero = scale == 0  # its scale underflows
    scale[zero] = 1
    pin_code = torch.clamp(torch.round(extreme / scale), grid.lo, grid.hi)
    return scale, pinned, pin_code, zero


def round_to_nearest(weight: Any, grid: Grid) -> Any:
    """What the quantizer itself makes of ``weight`` (out, in): each block rounded to its nearest codes; float64."""
    w = weight.detach().double()
    scale, _, _, zero = (t[..., None] for t in _block_grid(w, grid))
    codes = (w.reshape(w.shape[0], -1, grid.block) / scale).round().clamp(grid.lo, grid.hi).masked_fill(zero, 0)
    return (codes * scale).reshape(w.shape)


def gptq_weights(model: Any, calibration: Calibration, grids: dict[str, Grid], label: str,
                 act_order: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """GPTQ for the ``torch.nn.Linear`` modules of ``model`` named in ``grids`` (module name -> its grid),
    Hessians from ``model`` as it is (it is not changed). Returns ``{module name + ".weight": float32
    weights on the grid}`` and the record's figures."""
    from edgeft.core.progress import step_progress

    modules = {n: model.get_submodule(n) for n in grids}
    rounded: dict[str, Any] = {}
    ratios: list[float] = []
    groups = _layer_groups(modules)
    with step_progress(f"GPTQ onto {label}", "tokens") as bar:
        task = bar.add_task(f"GPTQ onto {label}", total=len(groups) * len(calibration.sequences) + len(modules),
                            tokens="")
        for group in groups:
            hessians = _hessians(model, {n: modules[n] for n in group}, calibration, lambda: bar.advance(task))
            for name in group:
                w0, h, grid = modules[name].weight.detach().double(), hessians[name], grids[name]
                new = round_onto_grid(w0, h, grid, act_order)
                ratios.append(output_error(new, w0, h) / max(output_error(round_to_nearest(w0, grid), w0, h), 1e-30))
                rounded[name + ".weight"] = new.float()
                bar.advance(task)
            del hessians
    ratios.sort()
    info = {**calibration.describe(), "tensors": len(rounded), "damp": DAMP, "first_positions_skipped": SKIP_FIRST,
            "act_order": act_order,
            "grids": sorted({g.name for g in grids.values()}),
            # per tensor, the output error on the calibration tokens against the quantizer's own rounding
            "output_error_vs_round_to_nearest": ({"median": round(ratios[len(ratios) // 2], 4),
                                                  "max": round(ratios[-1], 4)} if ratios else None)}
    return rounded, info


def decoder_linears(model: Any, block: int) -> list[str]:
    """Names of the ``torch.nn.Linear`` modules inside the decoder blocks whose input splits into whole blocks."""
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _LAYER.search("." + n + ".")
            and m.in_features % block == 0]


def _layer_groups(modules: dict[str, Any]) -> list[list[str]]:
    """Module names in groups of whole decoder layers whose Hessians fit in HESSIAN_BUDGET together."""
    by_layer: dict[int, list[str]] = {}
    for name in modules:
        m = _LAYER.search("." + name)
        by_layer.setdefault(int(m.group(1)) if m else -1, []).append(name)
    groups: list[list[str]] = []
    size = 0
    for _, names in sorted(by_layer.items()):
        need = sum(modules[n].in_features ** 2 * 8 for n in names)
        if groups and size + need <= HESSIAN_BUDGET:
            groups[-1] += names
            size += need
        else:
            groups.append(list(names))
            size = need
    return groups


def _hessians(model: Any, modules: dict[str, Any], calibration: Calibration, advance: Any) -> dict[str, Any]:
    """Module name -> mean x xᵀ (float64) of its input over the calibration tokens; modules fed the same
    tensor (q/k/v, gate/up) share one matrix."""
    import torch

    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}
    seen: dict[str, Any] = {"x": None, "key": None}

    def hook(name: str):
        def record(_module: Any, inputs: tuple[Any, ...], _output: Any) -> None:
            x = inputs[0]
            if x is seen["x"]:  # the same input as the module just before it
                alias[name] = seen["key"]
                return
            seen["x"], seen["key"], alias[name] = x, name, name
            x = x.detach()[:, SKIP_FIRST:].reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.inference_mode():
            for ids in calibration.sequences:
                model(input_ids=torch.tensor([ids]))
                seen["x"] = None
                advance()
    finally:
        for h in handles:
            h.remove()
    means = {k: sums[k] / counts[k] for k in sums}
    return {n: means[k] for n, k in alias.items()}


def output_error(q: Any, w: Any, h: Any) -> float:
    """tr((Q - W) H (Q - W)ᵀ): the squared output error over the calibration tokens, per token."""
    d = q.double() - w
    return float(((d @ h) * d).sum())
