"""Atomic file and directory writes, and a disk-space check.

A writer never leaves a half-written artifact under its final name: it writes to a temporary
sibling (same filesystem) and renames when complete. A crash leaves only ``.NAME.PID*.partial``
names, which the next write of ``NAME`` removes once process PID is gone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from edgeft.core.errors import EdgeftError

PARTIAL_SUFFIX = ".partial"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(final: Path) -> None:
    """Remove what interrupted writes of ``final`` left beside it (``.NAME.PID[.*].partial``).

    Only leftovers of processes that are gone: a concurrent writer keeps its temporary files.
    """
    prefix = f".{final.name}."
    for p in final.parent.glob(glob.escape(prefix) + "*" + PARTIAL_SUFFIX):
        pid = p.name[len(prefix):].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        with contextlib.suppress(OSError):
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; swap it into place on success.

    With ``overwrite`` an existing ``final`` is replaced only after the new one is complete,
    so the old result survives a crash.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise EdgeftError(f"{final} already exists; pass --overwrite to replace it")
            old = final.with_name(f".{final.name}.{os.getpid()}.old{PARTIAL_SUFFIX}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def clean_partials(directory: str | os.PathLike) -> None:
    """Remove leftovers of interrupted writes in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.glob(f".*{PARTIAL_SUFFIX}"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def dir_size(path: str | os.PathLike) -> int:
    """Size in bytes of a file, or of all files below a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ensure_free_space(target: str | os.PathLike, need_bytes: int, what: str) -> None:
    """Fail before starting if the filesystem of ``target`` has less than ``need_bytes`` free."""
    target = Path(target)
    probe = target if target.exists() else target.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise EdgeftError(
            f"not enough disk space for {what} at {target}: need about "
            f"{need_bytes / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free"
        )


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool, flag: str = "--output") -> Path:
    """Create ``path``; refuse a non-empty existing directory unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EdgeftError(f"{flag} {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise EdgeftError(f"{flag} {path} is not empty; pass --overwrite to replace its contents")
    path.mkdir(parents=True, exist_ok=True)
    return path
