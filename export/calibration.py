"""Calibration data for quantization: the user's own rows, rendered as the model will see them.

The training rows are the default calibration set (never the evaluation rows: the artifact is
judged on those); ``--calibration FILE`` overrides it. Rows are read with the trainer's reader
(``edgeft.core.rows``), rendered through the tokenizer's chat template (chat and instruction
rows) or as prompt + completion / plain text, tokenised, and taken in file order until
``max_tokens``. Used by the GGUF importance matrix and the ONNX calibrated quantizers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.core.errors import DataError

MAX_TOKENS = 16_384  # about 300 short instruction rows; llama-imatrix's default is a few tens of thousands
MAX_ROW_TOKENS = 512


@dataclass
class Calibration:
    """Token id sequences to calibrate on, and where they came from (for the record)."""

    path: str
    sha256: str
    rows: int
    tokens: int
    sequences: list[list[int]] = field(repr=False)

    def describe(self) -> dict[str, Any]:
        return {"file": self.path, "sha256": self.sha256, "rows": self.rows, "tokens": self.tokens}


def load_calibration(path: str | Path, tokenizer: Any, *, max_tokens: int = MAX_TOKENS,
                     flag: str = "--calibration") -> Calibration:
    """Rows of ``path`` as token ids, up to ``max_tokens`` in all; a one-line error when none is usable."""
    from edgeft.core.rows import load_rows

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag} {path}: file not found")
    rows, _ = load_rows(path)  # raises a DataError naming the file (and line) when no row is usable
    sequences: list[list[int]] = []
    total = 0
    for row in rows:
        ids = tokenizer(_render(row, tokenizer), add_special_tokens=False)["input_ids"][:MAX_ROW_TOKENS]
        if len(ids) < 2:
            continue
        sequences.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    if not sequences:
        raise DataError(f"{flag} {path}: no row has text to calibrate on")
    return Calibration(str(path.resolve()), _sha256(path), len(sequences), total, sequences)


def _render(row: Any, tokenizer: Any) -> str:
    """The text of one row as training feeds it: the chat template for chats, else the plain text."""
    if row.messages is not None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(row.messages, tokenize=False)
        return "\n".join(m["content"] for m in row.messages)
    if row.prompt is not None:
        return row.prompt + (row.completion or "")
    return row.text or ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
