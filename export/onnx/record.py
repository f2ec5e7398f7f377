"""Turn a verified export's figures into its verification record (checks, sizes, files, quantizer
settings, timings, bars, library versions) and write it beside the graph."""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgeft.core.fsutil import dir_size
from edgeft.core.records import RECORD_DIR_NAME, Check, Record, write_record
from export.onnx.verify import Bars
from export.onnx.write import onnx_size


def write_onnx_record(directory: Path, *, artifact: Path, reference: Path, variant: str, bars: Bars,
                      checks: list[Check], figures: dict[str, Any], fp32_bytes: int,
                      quantizer: dict[str, Any], timings: dict[str, float], kind: str = "onnx",
                      size: int | None = None) -> Record:
    """Write the record of the export in ``directory`` (to be renamed to ``artifact``) and return it.

    ``checks`` and ``figures`` come from the verification; the size check against the fp32 graph is added here.
    ``kind``: "onnx", or a phone format built on the export ("onnx-genai", "ort"); ``size``: bytes of the
    model file(s) when they are not ``model.onnx*`` (an ORT-format ``model.ort``).
    """
    size = onnx_size(directory) if size is None else size
    record = Record(artifact=str(artifact), kind=kind, reference=str(reference),
                    checks=checks + size_checks(bars, size, fp32_bytes), metrics={
        "variant": variant,
        "size_bytes": size,
        "fp32_size_bytes": fp32_bytes,
        "dir_bytes": dir_size(directory),
        "files": sorted({p.name for p in directory.iterdir()} | {RECORD_DIR_NAME}),
        "quantizer": quantizer,
        "timings": timings,
        **figures,
        "bars": asdict(bars),
        "versions": versions(),
    })
    write_record(directory, record)
    return record


def size_checks(bars: Bars, size: int, fp32_size: int) -> list[Check]:
    """The variant's size against the fp32 graph's, where its bars set a maximum ratio."""
    ratio = bars.max_size_ratio
    if ratio is None:
        return []
    return [Check("size_ratio_vs_fp32", round(size / fp32_size, 4), ratio, "<=")]


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the libraries the export ran with (and of ``extra`` packages)."""
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-genai", *extra):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out
