"""The run record, ``edgeft-run.json`` beside the adapter: how the base model was loaded (merge and
runtime rebuild it from this), the config, data counts, software versions, machine and final figures.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from edgeft.config import TrainConfig, to_dict
from edgeft.train.prepare import Prepared

RUN_RECORD = "edgeft-run.json"


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def start_record(cfg: TrainConfig, prep: Prepared, *, trainable: int, total: int, total_steps: int) -> dict[str, Any]:
    """The record of a run that has started (``"status": "running"``)."""
    device, dtype, stats, report = prep.device, prep.dtype, prep.stats, prep.report
    return {
        "method": cfg.method, "base_model": prep.model_ref, "base_model_ref": cfg.model,
        "torch_dtype": "float32" if cfg.method == "qlora" or device == "cpu" else dtype_name(dtype),
        "quantization": ({"load_in_4bit": True, "quant_type": cfg.quant_type, "double_quant": cfg.double_quant,
                          "compute_dtype": dtype_name(dtype), "quant_storage": "uint8", "blocksize": 64}
                         if cfg.method == "qlora" else None),
        "config": to_dict(cfg), "versions": versions(), "device": device_info(device),
        "data": {"schema": report.schema, "rows": stats.examples, "train_rows": len(prep.train_examples),
                 "eval_rows": len(prep.eval_examples), "truncated": stats.truncated,
                 "dropped_no_target": stats.dropped_no_target, "skipped_bad_rows": len(report.skipped),
                 "skipped_examples": report.skipped[:20]},
        "parameters": {"trainable": trainable, "total": total,
                       "trainable_percent": round(100 * trainable / total, 4) if total else None}, "total_steps": total_steps,
        "status": "running",
    }


def versions() -> dict[str, str]:
    """Python and the versions of the packages that decide what training computes."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("edgeft", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def device_info(device: str) -> dict[str, Any]:
    """The machine the run trained on."""
    import torch

    info: dict[str, Any] = {"device": device, "machine": platform.machine(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated (cuda) or peak resident memory of this process (cpu), in MiB."""
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
