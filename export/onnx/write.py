"""Write ONNX files: the fp32 export of a loaded model through optimum, saving a graph (external
data past 2 GB) and the size of what was written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError, one_line

TASK = "text-generation-with-past"
ONNX_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx_data"  # optimum's name for external weights; we keep it for every variant
# protobuf cannot serialise a message over 2 GiB; stay well below it before switching to external data.
EXTERNAL_DATA_BYTES = 1_800_000_000


def export_fp32(model: Any, model_dir: Path, dest: Path) -> None:
    """optimum export of a loaded fp32 model (no validation here: ours follows)."""
    from optimum.exporters.onnx import onnx_export_from_model

    try:
        onnx_export_from_model(model, dest, task=TASK, do_validation=False, device="cpu")
    except Exception as e:
        raise EdgeftError(f"--model {model_dir}: ONNX export failed: {one_line(e)}") from None
    if not (dest / ONNX_NAME).is_file():
        raise EdgeftError(f"--model {model_dir}: optimum wrote no {ONNX_NAME}")


def save_onnx(model: Any, path: Path) -> None:
    """Save a ModelProto, with one external-data file (``model.onnx_data``) when over 2 GB."""
    import onnx

    tensor_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    big = tensor_bytes > EXTERNAL_DATA_BYTES
    for stale in (path, path.with_name(ONNX_DATA_NAME)):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=ONNX_DATA_NAME, size_threshold=1024)


def onnx_size(directory: Path) -> int:
    """Bytes of the ONNX graph and its external data in ``directory``."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name.startswith("model.onnx"))
