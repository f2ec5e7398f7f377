"""GPTQ onto llama.cpp's q8_0 grid: the weights' share of q8_0's loss, compensated on the user's rows.

q8_0 stores each run of 32 weights along a row as one fp16 scale d (the run's largest magnitude
/ 127) and 32 int8 values; llama.cpp's quantizer rounds every weight to the nearest multiple of d,
and q8_0 ignores an importance matrix. GPTQ (Frantar et al., 2022) rounds a linear layer's input
columns one at a time and spreads each column's rounding error over the columns not yet rounded,
through the inverse of H = mean x xᵀ over the calibration tokens, so the layer's *output* on the
user's data moves less than with round-to-nearest.

The result is written back as float32 weights that already lie on q8_0's grid: each block's scale
is the fp16 one llama.cpp will derive, and the block's largest weight is pinned to ±127 so the
derivation gives exactly that scale. llama.cpp's own quantizer then stores these values unchanged;
``not_reproduced`` checks that on the file it writes, tensor by tensor, against the intermediate.
The activations' share of the loss (llama.cpp's CPU kernels quantize them to 8 bits per 32 values
too) is untouched.

Hessians (each row's first position left out, ``SKIP_FIRST``) are held in float64 for a group of
decoder layers at a time (``HESSIAN_BUDGET``), one pass over the calibration rows per group, so
memory stays bounded for larger models. Measured in benchmarks/exact_transforms.py and on the full
SST-2 dev set (the ``gptq`` column of ``tables.QUANT_TYPES``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np

from export.calibration import Calibration
from export.checkpoint import write_edited_copy
from export.gguf.plan import ExportPlan

GPTQ_TYPE = "q8_0"  # the one --type whose grid this rounds onto
BLOCK = 32  # llama.cpp's QK8_0
DAMP = 0.01  # fraction of the mean Hessian diagonal added to it (GPTQ's default)
HESSIAN_BUDGET = 2 << 30  # bytes of float64 Hessians held at once
# The first position of every row is left out of the Hessians: there most models put their
# attention sink, with activations hundreds of times the rest (SmolLM2: ~3000 against ~2), which would
# otherwise decide every weight's rounding for one token's sake. Measured on the SmolLM2 SST-2
# fine-tune (benchmarks/exact_transforms.py, 100 dev rows): q8_0 mean KL 0.00409 without GPTQ,
# 0.00318 with the first position in the Hessians, 0.00276 without it.
SKIP_FIRST = 1
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def gptq_targets(plan: ExportPlan, keep: bool = True) -> dict[str, str]:
    """HF linear module name -> GGUF tensor name, for every decoder-block weight the type stores as
    q8_0 (not kept above it by ``QuantSpec.keep`` when ``keep``; whole blocks of 32 along the input)."""
    kept = [re.compile(p) for p, _ in plan.spec.keep] if keep else []
    return {t.hf_name[: -len(".weight")]: t.gguf_name for t in plan.tensors
            if t.hf_name.endswith(".weight") and len(t.shape) == 2 and t.gguf_name.startswith("blk.")
            and t.shape[1] % BLOCK == 0 and not any(k.search(t.gguf_name) for k in kept)}


def round_to_q8_0_grid(weight: Any, hessian: Any) -> Any:
    """``weight`` (out, in) rounded onto q8_0's grid by GPTQ under ``hessian`` (in, in); float64."""
    import torch

    w = weight.detach().double().clone()
    n_in = w.shape[1]
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # an input never seen: its weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMP * torch.diagonal(h).mean() * torch.eye(n_in, dtype=h.dtype)
    # upper Cholesky factor of H^-1: row i holds how column i's error spreads over the later columns
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for start in range(0, n_in, BLOCK):
        end = min(start + BLOCK, n_in)
        blk = w[:, start:end].clone()  # every earlier block's error already applied
        amax, pinned = blk.abs().max(1)
        scale = _fp16_scale(amax)
        zero = scale == 0  # a block llama.cpp stores as zeros (its scale underflows fp16)
        scale[zero] = 1
        errors = torch.empty_like(blk)
        for j in range(end - start):
            q = torch.clamp(torch.round(blk[:, j] / scale), -127, 127)
            pin = pinned == j  # the block's largest weight sets its scale: keep it at +-127
            q[pin] = torch.where(blk[pin, j] >= 0, 127.0, -127.0).to(q.dtype)
            q[zero] = 0
            out[:, start + j] = q * scale
            errors[:, j] = (blk[:, j] - out[:, start + j]) / hinv[start + j, start + j]
            blk[:, j + 1:] -= errors[:, j:j + 1] * hinv[start + j, start + j + 1:end][None, :]
        w[:, end:] -= errors @ hinv[start:end, end:]
    return out


def round_to_nearest(weight: Any) -> Any:
    """What llama.cpp's q8_0 makes of ``weight`` (out, in), as float64."""
    w = weight.detach().double()
    blocks = w.reshape(w.shape[0], -1, BLOCK)
    scale = _fp16_scale(blocks.abs().amax(2, keepdim=True)).clamp(min=1e-30)
    return (blocks / scale).round().mul(scale).reshape(w.shape)


def _fp16_scale(amax: Any) -> Any:
    """The scale llama.cpp writes for blocks whose largest magnitude is ``amax``: amax / 127 in fp16."""
    return (amax / 127).float().half().double()


def write_gptq(plan: ExportPlan, calibration: Calibration, dest: Path,
               keep: bool = True) -> tuple[ExportPlan, dict[str, Any], list[str]]:
    """A copy of ``plan.model_dir`` in ``dest`` whose q8_0 tensors lie on q8_0's grid after GPTQ on
    ``calibration`` (written in float32, the only dtype that holds grid values exactly); returns the
    plan reading it, the record's ``gptq`` and the GGUF names of the tensors rounded."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.core.progress import step_progress

    targets = gptq_targets(plan, keep)
    model = AutoModelForCausalLM.from_pretrained(str(plan.model_dir), dtype=torch.float32).eval()
    modules = {n: m for n, m in model.named_modules() if n in targets and isinstance(m, torch.nn.Linear)}
    rounded: dict[str, Any] = {}
    ratios: list[float] = []
    groups = _layer_groups(modules)
    with step_progress("GPTQ onto q8_0", "tokens") as bar:
        task = bar.add_task("GPTQ onto q8_0", total=len(groups) * len(calibration.sequences) + len(modules), tokens="")
        for group in groups:
            hessians = _hessians(model, {n: modules[n] for n in group}, calibration, lambda: bar.advance(task))
            for name in group:
                w0, h = modules[name].weight.detach().double(), hessians[name]
                new = round_to_q8_0_grid(w0, h)
                rtn = round_to_nearest(w0)
                ratios.append(_output_error(new, w0, h) / max(_output_error(rtn, w0, h), 1e-30))
                rounded[name + ".weight"] = new.float()
                bar.advance(task)
            del hessians
    write_edited_copy(plan.model_dir, dest, lambda tensors: tensors.update(
        {k: v for k, v in rounded.items() if k in tensors}))
    new_plan = dataclasses.replace(
        plan, model_dir=dest, source_dtype="f32",
        tensors=[dataclasses.replace(t, file=dest / t.file.name, dtype="f32" if t.hf_name in rounded else t.dtype)
                 for t in plan.tensors])
    ratios.sort()
    info = {**calibration.describe(), "tensors": len(rounded), "damp": DAMP, "first_positions_skipped": SKIP_FIRST,
            # per tensor, the output error on the calibration tokens against llama.cpp's own rounding
            "output_error_vs_round_to_nearest": ({"median": round(ratios[len(ratios) // 2], 4),
                                                  "max": round(ratios[-1], 4)} if ratios else None)}
    return new_plan, info, [targets[n[: -len(".weight")]] for n in rounded]


def not_reproduced(intermediate: Path, quantized: Path, names: list[str]) -> list[str]:
    """The tensors among ``names`` whose q8_0 values in ``quantized`` differ from the float32 grid
    values of ``intermediate`` (empty: llama.cpp stored GPTQ's rounding byte for byte)."""
    import gguf

    a = {t.name: t for t in gguf.GGUFReader(str(intermediate)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(quantized)).tensors}
    bad = []
    for name in names:
        src, dst = a[name], b.get(name)
        if dst is None or dst.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            bad.append(name)
            continue
        want = np.asarray(src.data, dtype=np.float32).reshape(-1)
        got = gguf.quants.dequantize(dst.data, dst.tensor_type).reshape(-1)
        if not np.array_equal(want, got):
            bad.append(name)
    return bad


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


def _output_error(q: Any, w: Any, h: Any) -> float:
    """tr((Q - W) H (Q - W)ᵀ): the squared output error over the calibration tokens, per token."""
    d = q.double() - w
    return float(((d @ h) * d).sum())
