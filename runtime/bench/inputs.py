"""The paths ``edgeft bench`` is given: what each one is, whether its verification record still
holds, unique display names, and where an artifact keeps its tokenizer and model config.

``check_inputs`` reports every problem in one error, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError
from runtime.artifacts import GGUF, MERGED, UNMERGED, Artifact, base_model_of, describe
from runtime.bench.config import BenchConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one makes a HF tokenizer directory

Records = dict[str, dict[str, Any] | None]  # artifact path -> its verification record (None: none read)


def check_inputs(cfg: BenchConfig) -> tuple[Artifact, list[Artifact], Records]:
    """Describe the reference and artifacts and read their records; all problems in one error."""
    problems: list[str] = []
    reference = _describe_reference(cfg.reference, problems)
    artifacts: list[Artifact] = []
    records: Records = {}
    for path in cfg.artifacts:
        art = _describe_artifact(path, problems)
        if art is None:
            continue
        records[str(art.path)] = _checked_record(art, path, cfg.allow_unverified, problems)
        artifacts.append(art)
    if problems:
        raise EdgeftError("; ".join(problems))
    assert reference is not None
    reference, *artifacts = _unique_names([reference, *artifacts])
    return reference, artifacts, records


def _describe_reference(path: Path, problems: list[str]) -> Artifact | None:
    """The reference: an adapter directory (run unmerged) or a merged model directory."""
    reference = None
    try:
        reference = describe(path, flag="--reference")
        if reference.kind not in (UNMERGED, MERGED):
            problems.append(f"--reference {path}: a {reference.kind} artifact; the reference must be an "
                            "adapter directory (run unmerged) or a merged model directory")
    except EdgeftError as e:
        problems.append(e.format_message())
    return reference


def _describe_artifact(path: Path, problems: list[str]) -> Artifact | None:
    """One ``--artifact``: anything but an adapter directory (None, with the problem noted)."""
    try:
        art = describe(path, flag="--artifact")
    except EdgeftError as e:
        problems.append(e.format_message())
        return None
    if art.kind == UNMERGED:
        problems.append(f"--artifact {path}: an adapter directory; merge it (edgeft merge) or pass it as --reference")
        return None
    return art


def _checked_record(art: Artifact, path: Path, allow_unverified: bool, problems: list[str]) -> dict[str, Any] | None:
    """``art``'s verification record; missing, failed or outdated is a problem unless ``allow_unverified``."""
    from edgeft.core.records import files_changed, read_record

    record = None
    try:
        record = read_record(art.path)
    except EdgeftError:
        if not allow_unverified:
            problems.append(f"--artifact {path}: no verification record ({_record_name(art)} missing); "
                            "export it with edgeft, or pass --allow-unverified")
    if record is not None and record["status"] != "passed" and not allow_unverified:
        failed = [c.get("name", "?") for c in record.get("checks", []) if not c.get("passed", True)]
        problems.append(f"--artifact {path}: failed its verification ({', '.join(failed) or 'status failed'}); "
                        "pass --allow-unverified to benchmark it anyway")
    elif record is not None and not allow_unverified and (changed := files_changed(art.path, record)):
        problems.append(f"--artifact {path}: {changed}; its verification no longer holds: re-export it, "
                        "or pass --allow-unverified")
    return record


def _record_name(art: Artifact) -> str:
    from edgeft.core.records import record_path

    return record_path(art.path).name


def _unique_names(artifacts: list[Artifact]) -> list[Artifact]:
    """Labels must be unique in tables and plots: a repeated name gets its parent directory."""
    seen: dict[str, int] = {}
    for a in artifacts:
        seen[a.name] = seen.get(a.name, 0) + 1
    return [replace(a, name=f"{a.path.parent.name}/{a.name}") if seen[a.name] > 1 else a for a in artifacts]


def tokenizer_dir(art: Artifact) -> Path | None:
    """Where ``art``'s Hugging Face tokenizer lives (None: a GGUF, whose vocabulary is inside)."""
    if art.kind == GGUF:
        return None
    if has_tokenizer(art.path):
        return art.path
    if art.kind == UNMERGED:
        return Path(base_model_of(art.path))
    return art.path


def has_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` holds a Hugging Face tokenizer file."""
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


def model_dir(reference: Artifact) -> Path:
    """The directory with the reference's config and generation_config (the base, for an adapter)."""
    return Path(base_model_of(reference.path)) if reference.kind == UNMERGED else reference.path
