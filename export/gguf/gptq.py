"""GPTQ onto llama.cpp's q8_0 grid (the shared rounding is ``export/gptq.py``): which tensors, the
float32 checkpoint llama.cpp quantizes, and the check that it stored GPTQ's values.

q8_0 stores each run of 32 weights along a row as one fp16 scale d (the run's largest magnitude
/ 127) and 32 int8 values; llama.cpp's quantizer rounds every weight to the nearest multiple of d,
and q8_0 ignores an importance matrix. The GPTQ result is written back as float32 weights that already
lie on q8_0's grid, so llama.cpp's own quantizer stores them unchanged; ``not_reproduced`` checks that
on the file it writes, tensor by tensor, against the intermediate. The activations' share of the loss
(llama.cpp's CPU kernels quantize them to 8 bits per 32 values too) is untouched. Measured in
benchmarks/exact_transforms.py and on the full SST-2 dev set (the ``gptq`` column of ``tables.QUANT_TYPES``).
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
from export.gptq import Q8_0, gptq_weights

GPTQ_TYPE = "q8_0"  # the one --type whose grid this rounds onto
BLOCK = Q8_0.block  # llama.cpp's QK8_0


def gptq_targets(plan: ExportPlan, overrides: tuple[tuple[str, Any], ...] = ()) -> dict[str, str]:
    """HF linear module name -> GGUF tensor name, for every decoder-block weight the type stores as
    q8_0 (none that ``overrides`` gives another type; whole blocks of 32 along the input)."""
    kept = [re.compile(p) for p, _ in overrides]
    return {t.hf_name[: -len(".weight")]: t.gguf_name for t in plan.tensors
            if t.hf_name.endswith(".weight") and len(t.shape) == 2 and t.gguf_name.startswith("blk.")
            and t.shape[1] % BLOCK == 0 and not any(k.search(t.gguf_name) for k in kept)}


def write_gptq(plan: ExportPlan, calibration: Calibration, dest: Path,
               overrides: tuple[tuple[str, Any], ...] = ()) -> tuple[ExportPlan, dict[str, Any], list[str]]:
    """A copy of ``plan.model_dir`` in ``dest`` whose q8_0 tensors lie on q8_0's grid after GPTQ on
    ``calibration`` (written in float32, the only dtype that holds grid values exactly); returns the
    plan reading it, the record's ``gptq`` and the GGUF names of the tensors rounded."""
    import torch
    from transformers import AutoModelForCausalLM

    targets = gptq_targets(plan, overrides)
    model = AutoModelForCausalLM.from_pretrained(str(plan.model_dir), dtype=torch.float32).eval()
    names = [n for n, m in model.named_modules() if n in targets and isinstance(m, torch.nn.Linear)]
    rounded, info = gptq_weights(model, calibration, {n: Q8_0 for n in names}, "q8_0")
    del model
    write_edited_copy(plan.model_dir, dest, lambda tensors: tensors.update(
        {k: v for k, v in rounded.items() if k in tensors}))
    new_plan = dataclasses.replace(
        plan, model_dir=dest, source_dtype="f32",
        tensors=[dataclasses.replace(t, file=dest / t.file.name, dtype="f32" if t.hf_name in rounded else t.dtype)
                 for t in plan.tensors])
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
