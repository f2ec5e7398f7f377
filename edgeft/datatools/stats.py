"""``edgeft data stats``: what a data file holds, in one streaming pass: rows and schema, character
and token lengths (tokenised exactly as training does, under ``--model``'s tokenizer) with a PNG
histogram, rows that ``--max-seq-len`` would truncate, exact and near duplicates, and the
distribution of a ``--label-field``.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.core.errors import DataError
from edgeft.core.fsutil import prepare_output_dir
from edgeft.core.progress import say
from edgeft.core.rows import normalise
from edgeft.datatools.dedup import ExactIndex, NearDupIndex, open_indexes
from edgeft.datatools.report import DataReport
from edgeft.datatools.stream import check_input, first_schema, read_records, row_text

HISTOGRAM_PNG = "token_lengths.png"


@dataclass
class StatsConfig:
    source: Path
    output: Path  # directory: stats.report.{json,md} and token_lengths.png
    model: str | None = None  # tokenizer; None: the embedded default model
    tokens: bool = True
    max_seq_len: int = 512
    label_field: str | None = None
    schema: str = "auto"
    near_dup: bool = True
    near_dup_threshold: float = 0.8
    num_perm: int = 128
    overwrite: bool = False
    skip_bad_rows: bool = False


def describe(values: array) -> dict[str, float]:
    """min / mean / median / p90 / p95 / p99 / max of a list of lengths."""
    if not values:
        return {}
    a = np.frombuffer(values, dtype=np.uint32) if values.typecode == "I" else np.asarray(values)
    pct = np.percentile(a, [50, 90, 95, 99])
    return {"min": int(a.min()), "mean": round(float(a.mean()), 1), "median": float(pct[0]), "p90": float(pct[1]),
            "p95": float(pct[2]), "p99": float(pct[3]), "max": int(a.max())}


def plot_token_lengths(lengths: array, max_seq_len: int, path: Path) -> Path:
    """Histogram of token lengths with the ``--max-seq-len`` line."""
    from edgeft.plots import _pyplot, save_png

    fig, ax = _pyplot().subplots(figsize=(7, 4))
    ax.hist(np.frombuffer(lengths, dtype=np.uint32), bins=50, color="tab:blue", alpha=0.8)
    ax.axvline(max_seq_len, color="tab:red", ls="--", label=f"--max-seq-len {max_seq_len}")
    ax.set_xlabel("tokens per row (chat template included)")
    ax.set_ylabel("rows")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def _scan(cfg: StatsConfig, schema: str, report: DataReport, tok: Any) -> tuple[array, array, Counter]:
    """One pass: character and token lengths, duplicates (reported) and labels of the good rows."""
    chars, tokens, labels = array("I"), array("I"), Counter()
    # The indexes' databases go next to the output directory.
    with open_indexes(Path(cfg.output).parent, near=cfg.near_dup, threshold=cfg.near_dup_threshold,
                      num_perm=cfg.num_perm) as (exact, near):
        for line, rec in read_records(cfg.source, skip_bad=cfg.skip_bad_rows, on_bad=report.skip):
            report.counts["read"] += 1
            try:
                row = normalise(rec, schema, cfg.source, line)
                if cfg.label_field is not None and (not isinstance(rec, dict) or rec.get(cfg.label_field) is None):
                    raise DataError(f"{cfg.source}:{line}: missing field '{cfg.label_field}' (--label-field)")
            except DataError as e:
                if not cfg.skip_bad_rows:
                    raise
                report.skip("bad row", e.message)
                continue
            text = row_text(rec, schema)
            chars.append(len(text.replace("\x1f", "")))
            if tok is not None:
                from edgeft.datatools.tokens import row_tokens

                tokens.append(row_tokens(tok, row))
            if cfg.label_field is not None:
                labels[str(rec[cfg.label_field])] += 1
            _count_duplicates(exact, near, text, line, report)
    return chars, tokens, labels


def _count_duplicates(exact: ExactIndex, near: NearDupIndex | None, text: str, line: int, report: DataReport) -> None:
    first = exact.first_of(text, line)
    if first is not None:
        report.note("exact duplicate", f"line {line} = line {first}: {text}")
        return
    if near is not None:
        signature = near.signature(text)
        hit = near.find(signature)
        if hit is not None:
            report.note("near duplicate", f"line {line} ~ line {hit[0]} (Jaccard ~{hit[1]:.2f}): {text}")
        else:
            near.add(line, signature)


def data_stats(cfg: StatsConfig) -> DataReport:
    """Figures of ``cfg.source`` in ``cfg.output`` (stats.report.json/.md, token_lengths.png)."""
    source = check_input(cfg.source)
    if cfg.max_seq_len < 1:
        from edgeft.core.errors import ConfigError

        raise ConfigError("--max-seq-len must be >= 1")
    out_dir = prepare_output_dir(cfg.output, overwrite=cfg.overwrite)
    schema = first_schema(source, cfg.schema, skip_bad=cfg.skip_bad_rows)
    report = DataReport("stats", str(source), options={k: str(v) for k, v in asdict(cfg).items()})
    tok = None
    if cfg.tokens:
        from edgeft.datatools.tokens import tokenizer_for

        tok = tokenizer_for(cfg.model)
    chars, tokens, labels = _scan(cfg, schema, report, tok)
    report.counts["rows"] = len(chars)
    report.figures.update({"schema": schema, "chars": describe(chars),
                           "exact_duplicates": report.reasons["exact duplicate"],
                           "near_duplicates": report.reasons["near duplicate"]})
    if tok is not None and tokens:
        over = int((np.frombuffer(tokens, dtype=np.uint32) > cfg.max_seq_len).sum())
        report.figures.update({"tokenizer": cfg.model or "embedded default model", "tokens": describe(tokens),
                               "truncated_at_max_seq_len": {"max_seq_len": cfg.max_seq_len, "rows": over,
                                                            "fraction": round(over / len(tokens), 4)}})
        report.outputs.append(str(plot_token_lengths(tokens, cfg.max_seq_len, out_dir / HISTOGRAM_PNG)))
    if labels:
        report.figures["labels"] = dict(labels.most_common())
    paths = report.write(out_dir / "stats.report")
    report.outputs += [str(p) for p in paths]
    say(f"stats: {len(chars):,} rows ({schema}); report {paths[1]}")
    return report
