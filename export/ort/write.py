"""Convert an exported decoder graph to ORT format with onnxruntime's own tool
(``onnxruntime.tools.convert_onnx_models_to_ort``), which also writes the required-operators config a
reduced onnxruntime mobile build is compiled from (``build.sh --minimal_build --include_ops_by_config``)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import Iterator

from edgeft.core.errors import EdgeftError, one_line
from export.onnx.write import ONNX_DATA_NAME, ONNX_NAME
from runtime.mobile import ORT_MODEL, ORT_OPS_CONFIG

# Graph optimizations baked into the .ort file ("Fixed" style). "extended" holds the fusions every CPU
# runs (layer norm, attention pieces, GELU/SiLU); "all" adds layout rewrites chosen for the machine that
# converts (x86 NCHWc here), which an ARM phone's build would not have kernels for.
OPTIMIZATION_LEVEL = "extended"


def convert_to_ort(directory: Path) -> dict[str, str]:
    """``directory/model.onnx`` → ``model.ort`` + ``model.required_operators.config``; the .onnx is removed.

    Returns the conversion settings for the record.
    """
    from onnxruntime.tools import convert_onnx_models_to_ort as convert

    if (directory / ONNX_DATA_NAME).exists():
        raise EdgeftError("the ORT format holds at most 2 GB (one flatbuffer); this model's graph is larger: "
                          "use --format onnx or genai")
    work = directory / ".ort"
    try:
        with _optimization_level(OPTIMIZATION_LEVEL), contextlib.redirect_stdout(io.StringIO()):
            convert.convert_onnx_models_to_ort(directory / ONNX_NAME, output_dir=work,
                                               optimization_styles=[convert.OptimizationStyle.Fixed])
    except Exception as e:  # the tool raises on graphs with ops it cannot serialise
        raise EdgeftError(f"ORT-format conversion failed: {one_line(e)}") from None
    # The tool names its files after the level when it is not "all": model.extended.ort, ....extended.config.
    infix = "" if OPTIMIZATION_LEVEL == "all" else f".{OPTIMIZATION_LEVEL}"
    for name, written in ((ORT_MODEL, f"model{infix}.ort"), (ORT_OPS_CONFIG, f"model.required_operators{infix}.config")):
        if not (work / written).is_file():
            raise EdgeftError(f"ORT-format conversion wrote no {written}")
        os.replace(work / written, directory / name)
    config = directory / ORT_OPS_CONFIG  # its header names the temporary file it was generated from
    config.write_text("".join(f"# - {ORT_MODEL}\n" if ln.startswith("# - ") else ln
                              for ln in config.read_text().splitlines(keepends=True)))
    shutil.rmtree(work, ignore_errors=True)
    (directory / ONNX_NAME).unlink()
    return {"tool": "onnxruntime.tools.convert_onnx_models_to_ort", "optimization_style": "Fixed",
            "optimization_level": OPTIMIZATION_LEVEL}


def required_operators(directory: Path) -> list[str]:
    """``domain;opset;Op1,Op2`` lines of the operators config (comments dropped)."""
    lines = (directory / ORT_OPS_CONFIG).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


@contextlib.contextmanager
def _optimization_level(level: str) -> Iterator[None]:
    """The tool reads its optimization level from this environment variable only."""
    key = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"
    previous = os.environ.get(key)
    os.environ[key] = level
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous
