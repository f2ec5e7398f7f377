"""The reference's compared logits, seen from the bench process: how large they would be (refused
over REF_LOGITS_MAX_BYTES), the disk they need, where they live, and what each worker's spec says
about them.

Today the reference worker writes them, float32 (compared positions, vocabulary), to a .npy in the
work directory, and every artifact worker memory-maps it and compares one row slice at a time
(``runtime.worker.score``). This module is the bench side of that exchange and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeft.core.errors import ConfigError
from runtime.bench.evalset import EvalSet

REF_LOGITS_MAX_BYTES = 2 * 2**30  # reference logits file: rows x compared positions x vocab x 4 bytes
REFERENCE_LOGITS_FILE = "reference_logits.npy"  # inside the work directory
DISK_MARGIN_BYTES = 64 * 2**20  # free space asked for beyond the logits (specs, results, report)


def reference_logits_bytes(evals: EvalSet, vocab_size: int) -> int:
    """Bytes of the reference logits for ``evals``; a ``ConfigError`` naming --max-rows over the limit."""
    nbytes = evals.positions * vocab_size * 4
    if nbytes > REF_LOGITS_MAX_BYTES:
        raise ConfigError(f"--max-rows: {evals.positions} compared positions x {vocab_size} vocabulary need "
                          f"{nbytes / 2**30:.1f} GiB of reference logits (limit {REF_LOGITS_MAX_BYTES / 2**30:.0f}); "
                          "lower --max-rows")
    return nbytes


def ensure_room_for_reference_logits(out: Path, nbytes: int) -> None:
    """Refuse to start when ``out``'s disk cannot hold ``nbytes`` of reference logits and the rest."""
    from edgeft.core.fsutil import ensure_free_space

    ensure_free_space(out, nbytes + DISK_MARGIN_BYTES, "the reference logits")


def reference_logits_file(work: Path) -> Path:
    """The reference logits file inside the work directory ``work``."""
    return work / REFERENCE_LOGITS_FILE


def logits_spec(work: Path, *, reference: bool) -> dict[str, Any]:
    """The worker spec's logits fields: the reference writes the file, every artifact reads it."""
    return {"logits_file": str(reference_logits_file(work)), "write_logits": reference}
