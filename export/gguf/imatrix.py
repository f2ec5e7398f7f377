"""An importance matrix for llama.cpp's quantizer, from the user's calibration rows.

For every linear layer that becomes a quantized GGUF tensor, the mean of x² over the calibration
tokens for each input column x (what ``llama-imatrix`` computes from llama.cpp's own activations;
here from the merged PyTorch model in fp32). llama.cpp's k-quants and q4/q5 fallbacks weight each
column's rounding error by it; q8_0 ignores it.

An entry whose name is not a GGUF tensor name is ignored by llama.cpp without an error, and the
file comes out as if no matrix had been given: every name here is taken from the export plan's
own tensor table, and ``quantize.py`` fails on llama.cpp's "did not find weights" lines.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from export.calibration import Calibration
from export.gguf.plan import ExportPlan


def importance_matrix(plan: ExportPlan, calibration: Calibration) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean x² per input column (float32, in_features long) of that linear layer."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.core.progress import step_progress

    by_module = {t.hf_name[: -len(".weight")]: t.gguf_name for t in plan.tensors
                 if t.hf_name.endswith(".weight") and len(t.shape) == 2 and t.gguf_name != "token_embd.weight"}
    model = AutoModelForCausalLM.from_pretrained(str(plan.model_dir), dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(_module: Any, inputs: tuple[Any, ...], _output: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(by_module[n])) for n, m in model.named_modules()
               if n in by_module and isinstance(m, torch.nn.Linear)]
    try:
        with torch.inference_mode(), step_progress("importance matrix", "tokens") as bar:
            task = bar.add_task("importance matrix", total=len(calibration.sequences), tokens="")
            for ids in calibration.sequences:
                model(input_ids=torch.tensor([ids]))
                bar.advance(task)
    finally:
        for h in handles:
            h.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}


def imatrix_param(llama_cpp: Any, matrix: dict[str, np.ndarray]) -> tuple[Any, list[Any]]:
    """llama.cpp's NULL-terminated ``llama_model_imatrix_data`` array, and the buffers it points into
    (keep them referenced until the quantizer returns)."""
    keep: list[Any] = []
    entries = (llama_cpp.llama_model_imatrix_data * (len(matrix) + 1))()
    for i, (name, values) in enumerate(sorted(matrix.items())):
        data = np.ascontiguousarray(values, dtype=np.float32)
        raw = name.encode()
        keep += [data, raw]
        entries[i].name = raw
        entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = data.size
    return entries, keep


def imatrix_metadata(llama_cpp: Any, calibration: Calibration, n_entries: int) -> Any:
    """The ``quantize.imatrix.*`` keys llama-quantize writes, as quantizer key-value overrides."""
    items = [("quantize.imatrix.file", "edgeft (PyTorch mean x² per input column)"),
             ("quantize.imatrix.dataset", f"{calibration.path} sha256:{calibration.sha256[:16]}"[-127:]),
             ("quantize.imatrix.entries_count", n_entries),
             ("quantize.imatrix.chunks_count", calibration.rows)]
    arr = (llama_cpp.llama_model_kv_override * (len(items) + 1))()  # an empty key ends the list
    for i, (key, value) in enumerate(items):
        arr[i].key = key.encode()
        if isinstance(value, int):
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = value
        else:
            arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            arr[i].value.val_str = value.encode()[:127]
    return arr
