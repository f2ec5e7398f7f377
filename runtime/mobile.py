"""What a phone-format directory is and whether its files are whole: ONNX Runtime GenAI folders
(``genai_config.json`` + graph), ORT-format models (``model.ort``) and ExecuTorch programs (``model.pte``).

Reads headers and small JSON files only (no onnxruntime, no executorch, no torch), so ``edgeft bench``
refuses a damaged artifact with one line before any worker starts.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from edgeft.core.errors import EdgeftError

GENAI, ORT, EXECUTORCH = "onnx-genai", "ort", "executorch"  # artifact kinds (runtime.artifacts.KINDS)
GENAI_CONFIG = "genai_config.json"
ORT_MODEL = "model.ort"
ORT_OPS_CONFIG = "model.required_operators.config"  # onnxruntime's reduced-build operator list
PTE_MODEL = "model.pte"

# kind -> the file that marks a directory as that kind (GenAI first: its folder also holds model.onnx).
MARKERS = ((GENAI, GENAI_CONFIG), (ORT, ORT_MODEL), (EXECUTORCH, PTE_MODEL))

# Flatbuffer file identifiers at bytes 4..8: onnxruntime's ORT format, ExecuTorch's program schema.
ORT_IDENTIFIER = b"ORTM"
PTE_IDENTIFIER = b"ET"  # followed by the two-digit schema version, e.g. "ET12"
PTE_EXTENDED_HEADER = b"eh00"  # ExecuTorch's extended header at byte 8: sizes of program and segments


def mobile_kind(directory: Path) -> str | None:
    """``onnx-genai``, ``ort`` or ``executorch`` from the marker file ``directory`` holds, else None."""
    return next((kind for kind, marker in MARKERS if (directory / marker).is_file()), None)


def describe_mobile(directory: Path, kind: str, *, flag: str) -> tuple[int, str]:
    """(bytes of the model files, precision) of a phone-format directory; a damaged one is a one-line error."""
    try:
        if kind == GENAI:
            files = genai_model_files(directory)
        elif kind == ORT:
            files = [check_ort_file(directory / ORT_MODEL)]
        else:
            files = [check_pte_file(directory / PTE_MODEL)]
    except EdgeftError as e:
        raise EdgeftError(f"{flag} {e.format_message()}") from None
    return sum(p.stat().st_size for p in files), recorded_variant(directory)


def genai_model_files(directory: Path) -> list[Path]:
    """The decoder graph ``genai_config.json`` names and its external data; a broken config raises."""
    path = directory / GENAI_CONFIG
    try:
        config = json.loads(path.read_text())
        filename = config["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EdgeftError(f"{path}: not a valid ONNX Runtime GenAI config (model.decoder.filename missing or "
                          "the file is not JSON); export it again") from None
    graph = directory / str(filename)
    if not graph.is_file() or graph.stat().st_size == 0:
        raise EdgeftError(f"{path}: its decoder {filename} is missing or empty; export it again")
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.startswith(str(filename)))


def check_ort_file(path: Path) -> Path:
    """``path`` starts like an ORT-format model (flatbuffer identifier ORTM)."""
    head = _head(path, 8)
    if len(head) < 8 or head[4:8] != ORT_IDENTIFIER:
        raise EdgeftError(f"{path}: not an ORT-format model (no ORTM identifier; {path.stat().st_size} bytes)")
    return path


def check_pte_file(path: Path) -> Path:
    """``path`` is a whole ExecuTorch program: identifier ET.., and as long as its extended header says."""
    head = _head(path, 40)
    size = path.stat().st_size
    if len(head) < 8 or head[4:6] != PTE_IDENTIFIER:
        raise EdgeftError(f"{path}: not an ExecuTorch program (no ET identifier; {size} bytes)")
    if head[8:12] == PTE_EXTENDED_HEADER and len(head) >= 32:
        header_len, program_size, segment_base = struct.unpack_from("<IQQ", head, 12)
        segment_size = struct.unpack_from("<Q", head, 32)[0] if header_len >= 32 and len(head) >= 40 else 0
        expected = max(program_size, segment_base + segment_size)
        if size < expected:
            raise EdgeftError(f"{path}: truncated ExecuTorch program: its header declares {expected} bytes, "
                              f"the file has {size}; export it again")
    return path


def recorded_variant(directory: Path) -> str:
    """The variant the verification record names ("fp32", "int8", "8da4w", ...), else "unknown"."""
    from edgeft.core.records import RECORD_DIR_NAME

    try:
        variant = json.loads((directory / RECORD_DIR_NAME).read_text()).get("metrics", {}).get("variant")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return str(variant) if variant else "unknown"


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)
