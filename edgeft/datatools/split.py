"""``edgeft data split``: train / eval / test files with no row shared between them, near duplicates
included: rows that are exact or near duplicates (MinHash-LSH) form one group and a group goes to one
split. Two streaming passes: the first groups rows (and reads the ``--stratify`` field), the second
writes each row to its group's split. With ``--stratify`` each value gets the split fractions.
"""

from __future__ import annotations

import random
from array import array
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeft.core.errors import ConfigError, DataError
from edgeft.core.fsutil import prepare_output_dir
from edgeft.core.progress import say
from edgeft.core.rows import normalise
from edgeft.datatools.dedup import ExactIndex, NearDupIndex, open_indexes
from edgeft.datatools.report import DataReport
from edgeft.datatools.stream import check_input, check_output, first_schema, read_records, row_text
from edgeft.datatools.writer import jsonl_outputs

SPLITS = ("train", "eval", "test")


@dataclass
class SplitConfig:
    source: Path
    output: Path  # a directory: train.jsonl, eval.jsonl, test.jsonl, split.report.{json,md}
    eval_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    stratify: str | None = None
    schema: str = "auto"
    columns: tuple[str, ...] = ()
    near_dup: bool = True
    near_dup_threshold: float = 0.8
    num_perm: int = 128
    overwrite: bool = False
    skip_bad_rows: bool = False

    def validate(self) -> None:
        p = []
        if not 0 <= self.eval_fraction < 1 or not 0 <= self.test_fraction < 1:
            p.append("--eval and --test must be in [0, 1)")
        if self.eval_fraction + self.test_fraction >= 1:
            p.append("--eval + --test must leave rows for training (sum < 1)")
        if not 0 < self.near_dup_threshold <= 1:
            p.append("--near-dup-threshold must be in (0, 1]")
        if p:
            raise ConfigError("; ".join(p))


@dataclass
class _Groups:
    """Pass one's result: for the k-th good row its line and group (the index of the group's first
    row), and each group's stratum and size."""

    lines: array
    group_of: array
    stratum: dict[int, str]
    size: Counter


def _stratum(rec: Any, field: str | None, where: str) -> str:
    if field is None:
        return ""
    if not isinstance(rec, dict) or field not in rec or rec[field] is None:
        raise DataError(f"{where}: missing field '{field}' (--stratify)")
    return str(rec[field])


def group_rows(cfg: SplitConfig, schema: str, report: DataReport) -> _Groups:
    """Pass one: check each row, find its duplicate group, read its stratum."""
    groups = _Groups(array("q"), array("q"), {}, Counter())
    # The indexes' databases go next to the output directory.
    with open_indexes(Path(cfg.output).parent, near=cfg.near_dup, threshold=cfg.near_dup_threshold,
                      num_perm=cfg.num_perm) as (exact, near):
        _group(cfg, schema, report, groups, exact, near)
    return groups


def _group(cfg: SplitConfig, schema: str, report: DataReport, groups: _Groups, exact: ExactIndex,
           near: NearDupIndex | None) -> None:
    """Fill ``groups`` row by row: a row joins the group of its first exact or near duplicate."""
    for line, rec in read_records(cfg.source, skip_bad=cfg.skip_bad_rows, on_bad=report.skip):
        report.counts["read"] += 1
        k = len(groups.lines)
        try:
            if not cfg.columns:
                normalise(rec, schema, cfg.source, line)
            stratum = _stratum(rec, cfg.stratify, f"{cfg.source}:{line}")
        except DataError as e:
            if not cfg.skip_bad_rows:
                raise
            report.skip("bad row", e.message)
            continue
        text = row_text(rec, schema, cfg.columns)
        group = exact.first_of(text, k)
        if group is not None:
            report.note("kept together: exact duplicate", f"line {line} = line {groups.lines[group]}: {text}")
        elif near is not None:
            signature = near.signature(text)
            hit = near.find(signature)
            if hit is not None:
                group = groups.group_of[hit[0]]
                report.note("kept together: near duplicate", f"line {line} ~ line {groups.lines[hit[0]]}: {text}")
            else:
                near.add(k, signature)
        if group is None:
            group = k
            groups.stratum[k] = stratum
        groups.lines.append(line)
        groups.group_of.append(group)
        groups.size[group] += 1


def assign_splits(groups: _Groups, eval_fraction: float, test_fraction: float, seed: int) -> dict[int, str]:
    """Each group's split: per stratum, groups in a seeded random order fill eval, then test, to
    their fractions of the stratum's rows; the rest train."""
    by_stratum: dict[str, list[int]] = defaultdict(list)
    for group, stratum in groups.stratum.items():
        by_stratum[stratum].append(group)
    rng = random.Random(seed)
    split_of: dict[int, str] = {}
    for stratum in sorted(by_stratum):
        members = by_stratum[stratum]
        rng.shuffle(members)
        rows = sum(groups.size[g] for g in members)
        want = {"eval": round(rows * eval_fraction), "test": round(rows * test_fraction)}
        have = Counter()
        for group in members:
            split = next((s for s in ("eval", "test") if have[s] < want[s]), "train")
            split_of[group] = split
            have[split] += groups.size[group]
    return split_of


def split_file(cfg: SplitConfig) -> DataReport:
    """Split ``cfg.source`` into ``cfg.output``/{train,eval,test}.jsonl with a report."""
    cfg.validate()
    cfg.source = check_input(cfg.source)
    out_dir = prepare_output_dir(cfg.output, overwrite=cfg.overwrite)
    schema = "columns" if cfg.columns else first_schema(cfg.source, cfg.schema, skip_bad=cfg.skip_bad_rows)
    report = DataReport("split", str(cfg.source), options={k: str(v) for k, v in asdict(cfg).items()})

    groups = group_rows(cfg, schema, report)
    if not groups.lines:
        raise DataError(f"{cfg.source}: no usable rows")
    split_of = assign_splits(groups, cfg.eval_fraction, cfg.test_fraction, cfg.seed)
    names = [s for s in SPLITS if s != "test" or cfg.test_fraction > 0]
    paths = {s: check_output(cfg.source, out_dir / f"{s}.jsonl", overwrite=True) for s in names}
    strata: dict[str, Counter] = {s: Counter() for s in names}
    with jsonl_outputs(paths) as writers:
        k = 0
        for line, rec in read_records(cfg.source, skip_bad=cfg.skip_bad_rows, on_bad=lambda *_: None):
            if k >= len(groups.lines) or line != groups.lines[k]:
                continue  # a bad row, skipped and reported in pass one
            split = split_of[groups.group_of[k]]
            writers[split].write(rec)
            if cfg.stratify:
                strata[split][str(rec[cfg.stratify])] += 1
            k += 1
        for s in names:
            report.counts[f"written {s}"] = writers[s].rows
    report.figures.update({"schema": schema, "duplicate_groups": sum(1 for n in groups.size.values() if n > 1)})
    if cfg.stratify:
        report.figures["strata"] = {s: dict(c.most_common()) for s, c in strata.items()}
    report.outputs = [str(p) for p in paths.values()]
    report_paths = report.write(out_dir / "split.report")
    say("split: " + ", ".join(f"{s} {report.counts[f'written {s}']:,}" for s in names) + f"; report {report_paths[1]}")
    return report
