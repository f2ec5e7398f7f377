"""Duplicate indexes for ``edgeft data clean`` and ``split``: exact duplicates by a digest of the
normalised text, near duplicates by MinHash signatures in a locality-sensitive-hashing index
(``datasketch``), confirmed by the signatures' estimated Jaccard similarity.

Memory grows with the rows kept, not with their text: 16 bytes per row for exact duplicates;
for near duplicates a 512-byte signature plus the LSH band keys.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np

from edgeft.datatools.textclean import dedup_key, dedup_text

CHAR_SHINGLE = 5  # texts up to SHORT_TEXT_CHARS: character 5-grams (a changed word moves few of them)
WORD_SHINGLE = 3  # longer texts: word 3-grams (5x fewer shingles, so MinHash is 5x cheaper)
SHORT_TEXT_CHARS = 256
SCHEME = "affine32"  # datasketch 2 default: 32-bit hash values (the stored signatures are uint32)
_WORD = re.compile(r"\w+")


def shingles(text: str) -> set[str]:
    """The shingle set whose Jaccard similarity the MinHash signatures estimate."""
    text = dedup_text(text)
    if len(text) <= SHORT_TEXT_CHARS:
        return {text[i:i + CHAR_SHINGLE] for i in range(max(1, len(text) - CHAR_SHINGLE + 1))}
    words = _WORD.findall(text)
    return {" ".join(words[i:i + WORD_SHINGLE]) for i in range(max(1, len(words) - WORD_SHINGLE + 1))}


def _crc32(shingle: str) -> int:
    # A fast, process-independent 32-bit hash (Python's hash() is salted per process).
    return zlib.crc32(shingle.encode("utf-8"))


class ExactIndex:
    """Digests of the normalised texts seen so far, each with the id of its first row."""

    def __init__(self) -> None:
        self._first: dict[bytes, int] = {}

    def first_of(self, text: str, row_id: int) -> int | None:
        """The id of an earlier row with the same normalised text; else remember this one, None."""
        key = dedup_key(text)
        first = self._first.get(key)
        if first is None:
            self._first[key] = row_id
        return first


class NearDupIndex:
    """MinHash-LSH over kept rows: ``find`` returns an earlier row whose estimated Jaccard
    similarity is at least ``threshold`` (LSH proposes candidates, signatures confirm them)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._signatures: dict[int, np.ndarray] = {}
        self._permutations = self.signature("").permutations  # drawn once, shared by every signature

    def signature(self, text: str) -> Any:
        """The MinHash of ``text``'s shingles."""
        from datasketch import MinHash

        shared = getattr(self, "_permutations", None)
        extra = {"permutations": shared, "scheme": SCHEME} if shared is not None else {"scheme": SCHEME}
        mh = MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=_crc32, **extra)
        mh.update_batch(list(shingles(text)))
        return mh

    def find(self, signature: Any) -> tuple[int, float] | None:
        """(id, estimated Jaccard) of the most similar earlier row at or above the threshold."""
        best = None
        for candidate in self._lsh.query(signature):
            similarity = float(np.mean(self._signatures[candidate] == signature.hashvalues))
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (candidate, similarity)
        return best

    def add(self, row_id: int, signature: Any) -> None:
        self._lsh.insert(row_id, signature, check_duplication=False)
        self._signatures[row_id] = signature.hashvalues.copy()
