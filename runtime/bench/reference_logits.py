"""The reference's compared distributions, seen from the bench process: how large they are, the
disk they need, where they live, and what each worker's spec says about them.

The reference worker keeps, per compared position, its ``TOP_K`` most likely tokens and their
log-probabilities (``edgeft.core.compare.top_k_summary``: 8 bytes per token, not the vocabulary's
4 bytes per entry), in two memory-mapped .npy files in the work directory; every artifact worker
compares one row at a time with them (``runtime.worker.score``). Memory stays one row's logits
whatever the number of rows, and thousands of rows need megabytes of disk, not gigabytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeft.core.compare import TOP_K
from edgeft.core.errors import ConfigError
from runtime.bench.evalset import EvalSet

REF_LOGITS_MAX_BYTES = 2 * 2**30  # reference summary: compared positions x TOP_K x (4-byte id + 4-byte log-prob)
REFERENCE_LOGITS_FILE = "reference_topk"  # inside the work directory: .ids.npy and .logprobs.npy
DISK_MARGIN_BYTES = 64 * 2**20  # free space asked for beyond the logits (specs, results, report)


def reference_logits_bytes(evals: EvalSet, vocab_size: int) -> int:
    """Bytes of the reference summary for ``evals``; a ``ConfigError`` naming --max-rows over the limit."""
    nbytes = evals.positions * min(TOP_K, vocab_size) * 8
    if nbytes > REF_LOGITS_MAX_BYTES:
        raise ConfigError(f"--max-rows: {evals.positions} compared positions need {nbytes / 2**30:.1f} GiB of "
                          f"reference top-{TOP_K} summaries (limit {REF_LOGITS_MAX_BYTES / 2**30:.0f}); lower --max-rows")
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
