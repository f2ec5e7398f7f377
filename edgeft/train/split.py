"""``edgeft train --split-by FIELD``: one task adapter per distinct value of a data field, trained one after
the other from one data file.

The rows of the data file (and of ``--eval-data``) are grouped by the field's value and written, as
read, to ``OUTPUT/_data/<value>.train.jsonl`` (``.eval.jsonl``); each group then trains as an ordinary
run into ``OUTPUT/<value>/``, with its own run record that names its split file. ``OUTPUT/edgeft-split.json``
lists the tasks, their row counts and directories.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeft.config import TrainConfig, validate
from edgeft.core.errors import ConfigError, DataError
from edgeft.core.fsutil import atomic_file, write_json
from edgeft.core.progress import say
from edgeft.core.rows import LoadReport, iter_records

SPLIT_DATA_DIR = "_data"  # cannot clash with a task directory: task names start with a letter or digit
SPLIT_RECORD = "edgeft-split.json"
# A task value becomes a directory name: letters, digits, '.', '_', '-', starting with a letter or digit.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class TaskRows:
    """The raw records of one data file, grouped by task value (in order of first appearance)."""

    path: Path
    groups: dict[str, list[Any]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def group_rows(path: Path, split_by: str, *, skip_bad: bool) -> TaskRows:
    """The records of ``path`` grouped by their ``split_by`` field; a row without a usable value is a
    one-line ``DataError`` naming file, line and field (skipped and reported with ``skip_bad``)."""
    report = LoadReport(str(path), "raw")
    out = TaskRows(path, skipped=report.skipped)
    for line, record in iter_records(path, skip_bad=skip_bad, report=report):
        try:
            task = task_value(record, split_by, f"{path}:{line}")
        except DataError as e:
            if not skip_bad:
                raise
            out.skipped.append(e.message)
            continue
        out.groups.setdefault(task, []).append(record)
    if not out.groups:
        raise DataError(f"{path}: no row has a '{split_by}' field to split by")
    return out


def task_value(record: Any, split_by: str, where: str) -> str:
    """The task name of one record: a string (or integer) that is a safe directory name."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(record).__name__}")
    value = record.get(split_by)
    if value is None:
        raise DataError(f"{where}: missing field '{split_by}' (--split-by {split_by})")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{split_by}' must be a string, got {type(value).__name__}")
    if not SAFE_NAME.fullmatch(value):
        raise DataError(f"{where}: field '{split_by}' value {value[:80]!r} is not a safe directory name (use up to "
                        "64 letters, digits, '.', '_' or '-', starting with a letter or digit)")
    return value


def plan_split(cfg: TrainConfig) -> tuple[TaskRows, TaskRows | None]:
    """The training rows by task, and the evaluation rows by task (each train task needs its eval rows)."""
    assert cfg.split_by and cfg.data, "validate() requires both"
    train = group_rows(Path(cfg.data), cfg.split_by, skip_bad=cfg.skip_bad_rows)
    evals = group_rows(Path(cfg.eval_data), cfg.split_by, skip_bad=cfg.skip_bad_rows) if cfg.eval_data else None
    if evals is not None:
        missing = [t for t in train.groups if t not in evals.groups]
        extra = [t for t in evals.groups if t not in train.groups]
        if missing or extra:
            what = (f"no rows for task(s) {', '.join(missing)}" if missing
                    else f"task(s) {', '.join(extra)} have no training rows in {cfg.data}")
            raise DataError(f"--eval-data {cfg.eval_data}: {what} (--split-by {cfg.split_by})")
    return train, evals


def write_rows(records: list[Any], path: Path) -> Path:
    """``records`` as JSON Lines, written atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def task_values(values: dict[str, Any], cfg: TrainConfig, task: str, evals: TaskRows | None) -> dict[str, Any]:
    """The options of one task's run: its split files and its own output directory."""
    out, data_dir = Path(cfg.output or "."), Path(cfg.output or ".") / SPLIT_DATA_DIR
    sub = {**values, "split_by": None, "output": str(out / task), "data": str(data_dir / f"{task}.train.jsonl")}
    if evals is not None:
        sub["eval_data"] = str(data_dir / f"{task}.eval.jsonl")
    return sub


def train_split(values: dict[str, Any], cfg: TrainConfig, *, resume: bool,
                train_one: Callable[[dict[str, Any], TrainConfig, bool], None]) -> dict[str, Any]:
    """Split the rows by task and run ``train_one(values, cfg, resume)`` for each task in turn; returns the
    split summary (also written to ``OUTPUT/edgeft-split.json``). With ``resume``, a task whose run
    completed is skipped, one with a checkpoint continues from it, and one not started starts."""
    from edgeft.train.distributed import under_launcher

    if under_launcher():
        raise ConfigError("--split-by: start it without torchrun or accelerate; --num-processes N trains each task "
                          "on N processes")
    train, evals = plan_split(cfg)
    out = Path(cfg.output or ".")
    for skipped in train.skipped + (evals.skipped if evals else []):
        say(f"[yellow]skipped[/] {skipped}")
    summary: dict[str, Any] = {"split_by": cfg.split_by, "data": cfg.data, "eval_data": cfg.eval_data, "tasks": {}}
    for task, records in train.groups.items():
        eval_rows = evals.groups[task] if evals else []
        write_rows(records, out / SPLIT_DATA_DIR / f"{task}.train.jsonl")
        if evals is not None:
            write_rows(eval_rows, out / SPLIT_DATA_DIR / f"{task}.eval.jsonl")
        summary["tasks"][task] = {"rows": len(records), "eval_rows": len(eval_rows), "output": str(out / task)}
    counts = [f"{t} ({s['rows']} rows" + (f", {s['eval_rows']} eval)" if evals else ")")
              for t, s in summary["tasks"].items()]
    say(f"--split-by {cfg.split_by}: {len(counts)} task(s): {', '.join(counts)}")
    write_json(out / SPLIT_RECORD, summary)
    for task in train.groups:
        sub_values = task_values(values, cfg, task, evals)
        state = _task_state(Path(sub_values["output"])) if resume else "new"
        if state == "completed":
            say(f"task {task}: already trained in {sub_values['output']}")
            continue
        sub_cfg = TrainConfig(**sub_values)
        validate(sub_cfg)
        say(f"task {task}: training into {sub_cfg.output}")
        train_one(sub_values, sub_cfg, state == "checkpointed")
    return summary


def _task_state(task_dir: Path) -> str:
    """"completed" (its run record says so), "checkpointed" (it can resume) or "new"."""
    from edgeft.train.checkpoint import latest_checkpoint
    from edgeft.train.record import RUN_RECORD

    try:
        if json.loads((task_dir / RUN_RECORD).read_text()).get("status") == "completed":
            return "completed"
    except (OSError, ValueError):
        pass
    return "checkpointed" if task_dir.is_dir() and latest_checkpoint(task_dir) is not None else "new"
