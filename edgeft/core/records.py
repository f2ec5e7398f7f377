"""Verification records: the verdict written next to every artifact.

Record location (documented in the README):
- a directory artifact (merged model, ONNX export) holds ``DIR/edgeft-verify.json``;
- a file artifact (GGUF) has ``FILE.verify.json`` beside it.

Record fields: ``artifact``, ``kind``, ``status`` ("passed" or "failed"), ``reference``
(the model it was compared with), ``checks`` (a list of {name, value, threshold, op, passed}),
``metrics`` (free-form figures), ``files`` (the bytes the verdict is about: {name: {bytes,
sha256}} of the GGUF file, an ONNX export's ``model.onnx*``, a merged model's ``*.safetensors``),
``created``, ``edgeft_version``. A record vouches only for files that still match ``files``.

This module imports nothing heavy: ``runtime`` reads records on a device without torch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeft import __version__
from edgeft.core.errors import EdgeftError
from edgeft.core.fsutil import write_json

RECORD_DIR_NAME = "edgeft-verify.json"
RECORD_FILE_SUFFIX = ".verify.json"
ONNX_MODEL = "model.onnx"  # an ONNX export's graph; its external data files share the prefix
MOBILE_FILES = ("genai_config.json", "model.ort", "model.pte")  # phone formats (runtime/mobile.py)

_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


def record_path(artifact: str | Path) -> Path:
    """Where the verification record of ``artifact`` lives."""
    artifact = Path(artifact)
    if artifact.is_dir():
        return artifact / RECORD_DIR_NAME
    return artifact.with_name(artifact.name + RECORD_FILE_SUFFIX)


@dataclass
class Check:
    """One measured figure and the bar it must meet (``value op threshold``)."""

    name: str
    value: float | int | bool | str
    threshold: float | int | bool | str | None = None
    op: str = ">="
    passed: bool = True

    def __post_init__(self) -> None:
        if self.threshold is not None and isinstance(self.value, (int, float)):
            self.passed = bool(_OPS[self.op](self.value, self.threshold))


@dataclass
class Record:
    artifact: str
    kind: str
    reference: str
    checks: list[Check] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # set by write_record
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    edgeft_version: str = __version__

    @property
    def status(self) -> str:
        return "passed" if all(c.passed for c in self.checks) else "failed"

    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status
        return d

    def summary(self) -> str:
        parts = []
        for c in self.checks:
            v = f"{c.value:.4g}" if isinstance(c.value, float) else str(c.value)
            bar = f" (need {c.op} {c.threshold})" if c.threshold is not None else ""
            parts.append(f"{c.name}={v}{bar}{'' if c.passed else ' FAILED'}")
        return f"{self.status.upper()}: " + ", ".join(parts)


def weight_files(artifact: str | Path) -> list[Path]:
    """The files whose bytes a record vouches for: a GGUF file itself, an ONNX export's
    ``model.onnx*`` (with ``genai_config.json`` in a GenAI folder), an ORT-format ``model.ort``,
    an ExecuTorch ``model.pte``, a merged model's ``*.safetensors``."""
    artifact = Path(artifact)
    if not artifact.is_dir():
        return [artifact]
    graphs = [p for p in artifact.iterdir() if p.is_file() and (p.name.startswith(ONNX_MODEL) or p.name in MOBILE_FILES)]
    return sorted(graphs or artifact.glob("*.safetensors"))


# sha256 per file version (device, inode, size, mtime): `edgeft run` checks every artifact's
# record before each stage and again in the bench, and rereading hundreds of MiB for a file
# that has not changed since the last look is wasted I/O.
_DIGESTS: dict[tuple[int, int, int, int], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def file_digests(data: str | Path, name: str | None = None) -> dict[str, dict[str, Any]]:
    """{file name: {bytes, sha256}} of the weight files of ``data``; ``name`` labels a single file."""
    data = Path(data)
    return {(name if name and not data.is_dir() else p.name): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in weight_files(data)}


def write_record(artifact: str | Path, record: Record, *, data: str | Path | None = None) -> Path:
    """Write ``record`` next to ``artifact`` (atomically), bound to the artifact's bytes; return its path.

    ``data``: where those bytes are now, when they are not under ``artifact`` yet (a GGUF file
    is verified and recorded under its temporary name, then renamed into place).
    """
    path = record_path(artifact)
    record.files = file_digests(data or artifact, name=Path(artifact).name)
    write_json(path, record.to_dict())
    return path


def files_changed(artifact: str | Path, record: dict[str, Any]) -> str | None:
    """Why the files of ``artifact`` are not the ones ``record`` vouches for; None when they are."""
    want = record.get("files")
    if not isinstance(want, dict) or not want:
        return f"{record_path(artifact).name} names no files (written by an older edgeft); re-export it"
    artifact = Path(artifact)
    have = {(artifact.name if not artifact.is_dir() else p.name): p for p in weight_files(artifact) if p.exists()}
    for name, meta in want.items():
        path = have.pop(name, None)
        if path is None:
            return f"{name} is missing"
        size, meta = path.stat().st_size, meta if isinstance(meta, dict) else {}
        if size != meta.get("bytes"):
            return f"{name} is {size} bytes, its verification record says {meta.get('bytes')}"
        if _sha256(path) != meta.get("sha256"):
            return f"{name} has changed since it was verified (sha256 differs from its record)"
    if have:
        return f"{sorted(have)[0]} is not covered by its verification record"
    return None


def passed_and_bound(artifact: str | Path) -> bool:
    """True when ``artifact`` exists, its record passed, and its files are the ones verified."""
    if not Path(artifact).exists():
        return False
    try:
        record = read_record(artifact)
    except EdgeftError:
        return False
    return record["status"] == "passed" and files_changed(artifact, record) is None


def read_record(artifact: str | Path) -> dict[str, Any]:
    """Read the record of ``artifact``; a missing or unreadable one is a user error."""
    path = record_path(artifact)
    if not path.is_file():
        raise EdgeftError(f"{artifact}: no verification record ({path.name} missing); re-run the export that made it")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EdgeftError(f"{path}: unreadable verification record ({e})") from None
    if not isinstance(data, dict) or data.get("status") not in {"passed", "failed"}:
        raise EdgeftError(f"{path}: not a verification record (no status field)")
    return data
