"""Duplicate indexes for ``edgeft data clean``, ``split`` and ``stats``: exact duplicates by a digest of
the normalised text, near duplicates by MinHash signatures (``datasketch``) in a locality-sensitive-hashing
index with datasketch's band parameters, confirmed by the signatures' estimated Jaccard similarity.

Both indexes live on disk, in a throwaway SQLite database with a small fixed page cache, so memory stays
flat however many rows are kept; the database (about 0.8 KB per kept row for near duplicates) is removed
when the index is closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sqlite3
import tempfile
import weakref
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgeft.datatools.textclean import dedup_key, dedup_text

CHAR_SHINGLE = 5  # texts up to SHORT_TEXT_CHARS: character 5-grams (a changed word moves few of them)
WORD_SHINGLE = 3  # longer texts: word 3-grams (5x fewer shingles, so MinHash is 5x cheaper)
SHORT_TEXT_CHARS = 256
SCHEME = "affine32"  # datasketch 2 default: 32-bit hash values (the stored signatures are uint32)
CACHE_KIB = 8192  # SQLite page cache per index: what bounds its memory
BATCH_WRITES = 20_000  # inserts per transaction
_WORD = re.compile(r"\w+")

_EXACT_SCHEMA = "CREATE TABLE exact (digest BLOB PRIMARY KEY, first INTEGER NOT NULL) WITHOUT ROWID;"
# bands: one row per (LSH band, 64-bit digest of the band's hash values, kept row); the primary key
# (key first) is the index that ``find`` searches. signatures: each kept row's MinHash as uint32 bytes.
_NEAR_SCHEMA = """
CREATE TABLE bands (key INTEGER NOT NULL, band INTEGER NOT NULL, row INTEGER NOT NULL,
                    PRIMARY KEY (key, band, row)) WITHOUT ROWID;
CREATE TABLE signatures (row INTEGER PRIMARY KEY, hashvalues BLOB NOT NULL);
"""


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


def _close(db: sqlite3.Connection, directory: tempfile.TemporaryDirectory) -> None:
    db.close()
    directory.cleanup()


class _TempDatabase:
    """A throwaway SQLite database in its own temporary directory (under ``directory``, else the
    system's): no journal, no fsync, a fixed page cache, inserts committed every ``BATCH_WRITES``.
    Reads on the same connection see the uncommitted rows."""

    def __init__(self, schema: str, directory: Path | None):
        self._dir = tempfile.TemporaryDirectory(prefix="edgeft-dedup-", dir=directory)
        self.db = sqlite3.connect(Path(self._dir.name) / "index.sqlite", isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{CACHE_KIB}",
                       "locking_mode=EXCLUSIVE", "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(schema)
        self.db.execute("BEGIN")
        self._pending = 0
        self._finalizer = weakref.finalize(self, _close, self.db, self._dir)

    def wrote(self, rows: int = 1) -> None:
        """Count inserted rows; commit the transaction (and start the next) once a batch is full."""
        self._pending += rows
        if self._pending >= BATCH_WRITES:
            self.db.execute("COMMIT")
            self.db.execute("BEGIN")
            self._pending = 0

    def close(self) -> None:
        self._finalizer()


class _OnDisk:
    """Closing (also as a context manager) removes the index's database."""

    _store: _TempDatabase

    def close(self) -> None:
        self._store.close()

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


class ExactIndex(_OnDisk):
    """Digests of the normalised texts seen so far, each with the id of its first row."""

    def __init__(self, directory: Path | None = None) -> None:
        self._store = _TempDatabase(_EXACT_SCHEMA, directory)

    def first_of(self, text: str, row_id: int) -> int | None:
        """The id of an earlier row with the same normalised text; else remember this one, None."""
        key, db = dedup_key(text), self._store.db
        if db.execute("INSERT OR IGNORE INTO exact VALUES (?, ?)", (key, row_id)).rowcount == 1:
            self._store.wrote()
            return None
        return db.execute("SELECT first FROM exact WHERE digest = ?", (key,)).fetchone()[0]


class NearDupIndex(_OnDisk):
    """MinHash-LSH over kept rows: ``find`` returns an earlier row whose estimated Jaccard
    similarity is at least ``threshold`` (LSH proposes candidates, signatures confirm them)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1, directory: Path | None = None):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        # datasketch picks the bands (b bands of r hash values) that minimise false positives and
        # negatives at this threshold; only those parameters are kept, its in-memory tables are not.
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.bands, self.rows_per_band = lsh.b, lsh.r
        self._hashranges = list(lsh.hashranges)
        self._store = _TempDatabase(_NEAR_SCHEMA, directory)
        self._permutations = self.signature("").permutations  # drawn once, shared by every signature

    def signature(self, text: str) -> Any:
        """The MinHash of ``text``'s shingles."""
        from datasketch import MinHash

        shared = getattr(self, "_permutations", None)
        extra = {"permutations": shared, "scheme": SCHEME} if shared is not None else {"scheme": SCHEME}
        mh = MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=_crc32, **extra)
        mh.update_batch(list(shingles(text)))
        return mh

    def band_keys(self, hashvalues: np.ndarray) -> list[tuple[int, int]]:
        """(band, key) for each LSH band: key is a signed 64-bit digest of the band's hash values and
        its index, so equal keys mean equal bands (up to a 2**-64 chance, which the signature check catches)."""
        values = np.ascontiguousarray(hashvalues, dtype=np.uint32)
        return [(band, int.from_bytes(hashlib.blake2b(values[start:end].tobytes(), digest_size=8,
                                                      salt=band.to_bytes(8, "little")).digest(), "little", signed=True))
                for band, (start, end) in enumerate(self._hashranges)]

    def find(self, signature: Any) -> tuple[int, float] | None:
        """(id, estimated Jaccard) of the most similar earlier row at or above the threshold."""
        wanted = set(self.band_keys(signature.hashvalues))
        db, best = self._store.db, None
        marks = ",".join("?" * len(wanted))
        found = db.execute(f"SELECT band, key, row FROM bands WHERE key IN ({marks})", [k for _, k in wanted])
        candidates = sorted({row for band, key, row in found if (band, key) in wanted})
        for candidate in candidates:
            blob = db.execute("SELECT hashvalues FROM signatures WHERE row = ?", (candidate,)).fetchone()[0]
            similarity = float(np.mean(np.frombuffer(blob, dtype=np.uint32) == signature.hashvalues))
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (candidate, similarity)
        return best

    def add(self, row_id: int, signature: Any) -> None:
        """Index a kept row's signature."""
        db = self._store.db
        db.executemany("INSERT OR IGNORE INTO bands VALUES (?, ?, ?)",
                       [(key, band, row_id) for band, key in self.band_keys(signature.hashvalues)])
        db.execute("INSERT OR REPLACE INTO signatures VALUES (?, ?)",
                   (row_id, np.ascontiguousarray(signature.hashvalues, dtype=np.uint32).tobytes()))
        self._store.wrote(1 + self.bands)


@contextlib.contextmanager
def open_indexes(directory: Path | None, *, exact: bool = True, near: bool = True, threshold: float = 0.8,
                 num_perm: int = 128) -> Iterator[tuple[ExactIndex | None, NearDupIndex | None]]:
    """The exact and near-duplicate indexes a command asked for (None for one it did not), with their
    databases in ``directory``; both are removed when the block ends."""
    with contextlib.ExitStack() as stack:
        yield (stack.enter_context(ExactIndex(directory)) if exact else None,
               stack.enter_context(NearDupIndex(threshold, num_perm, directory=directory)) if near else None)
