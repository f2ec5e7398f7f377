"""Verification records: the verdict written next to every artifact.

Record location (documented in the README):
- a directory artifact (merged model, ONNX export) holds ``DIR/edgeft-verify.json``;
- a file artifact (GGUF) has ``FILE.verify.json`` beside it.

Record fields: ``artifact``, ``kind``, ``status`` ("passed" or "failed"), ``reference``
(the model it was compared with), ``checks`` (a list of {name, value, threshold, op, passed}),
``metrics`` (free-form figures), ``created``, ``edgeft_version``.

This module imports nothing heavy: ``runtime`` reads records on a device without torch.
"""

from __future__ import annotations

import datetime as _dt
import json
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeft import __version__
from edgeft.errors import EdgeftError
from edgeft.fsutil import write_json

RECORD_DIR_NAME = "edgeft-verify.json"
RECORD_FILE_SUFFIX = ".verify.json"

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


def write_record(artifact: str | Path, record: Record) -> Path:
    """Write ``record`` next to ``artifact`` (atomically) and return its path."""
    path = record_path(artifact)
    write_json(path, record.to_dict())
    return path


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
