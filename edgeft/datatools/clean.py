"""``edgeft data clean``: one streaming pass that cleans every text field (Unicode normalisation,
HTML, control characters, whitespace), drops rows outside the length bounds or below the quality
bars, rows not in the ``--language`` list, exact duplicates (normalised text) and near duplicates
(MinHash-LSH), and writes the kept rows plus a report of every change and every dropped row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeft.core.errors import ConfigError, DataError
from edgeft.core.progress import say
from edgeft.core.rows import normalise
from edgeft.datatools.dedup import ExactIndex, NearDupIndex, open_indexes
from edgeft.datatools.report import DataReport, report_prefix
from edgeft.datatools.stream import check_input, check_output, first_schema, read_records, row_text, text_slots
from edgeft.datatools.textclean import NORMAL_FORMS, clean_text, repetition_ratio, symbol_ratio
from edgeft.datatools.writer import jsonl_output


@dataclass
class CleanConfig:
    source: Path
    output: Path
    overwrite: bool = False
    schema: str = "auto"
    columns: tuple[str, ...] = ()  # text columns of a raw table (no trainer schema)
    normal_form: str = "NFKC"
    strip_html: bool = True
    min_chars: int = 1
    max_chars: int | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    model: str | None = None  # tokenizer for the token bounds
    max_repetition: float = 0.5
    max_symbol_ratio: float = 0.5
    dedup: bool = True
    near_dup: bool = True
    near_dup_threshold: float = 0.8
    num_perm: int = 128
    languages: tuple[str, ...] = ()  # ISO 639-1 codes to keep (empty: no language filter)
    min_language_confidence: float = 0.5
    skip_bad_rows: bool = False

    def validate(self) -> None:
        """Every problem with the options, at once."""
        p = []
        if self.normal_form not in NORMAL_FORMS:
            p.append(f"--normalize must be one of {', '.join(NORMAL_FORMS)}")
        if not 0 < self.near_dup_threshold <= 1:
            p.append("--near-dup-threshold must be in (0, 1]")
        if self.num_perm < 16:
            p.append("--num-perm must be >= 16")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            p.append("--max-chars must be >= --min-chars")
        for name in ("max_repetition", "max_symbol_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                p.append(f"--{name.replace('_', '-')} must be in [0, 1]")
        from edgeft.datatools.language import language_problems

        p += language_problems(self.languages, self.min_language_confidence)
        if p:
            raise ConfigError("; ".join(p))


class _RowFilter:
    """Length and quality bounds of one row's text: the reason it fails, or None."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        self.tok = None
        if cfg.min_tokens is not None or cfg.max_tokens is not None:
            from edgeft.datatools.tokens import tokenizer_for

            self.tok = tokenizer_for(cfg.model)
        self.language = None
        if cfg.languages:
            from edgeft.datatools.language import LanguageFilter

            self.language = LanguageFilter(cfg.languages, cfg.min_language_confidence)

    def reason(self, text: str) -> str | None:
        cfg, chars = self.cfg, len(text.replace("\x1f", ""))
        if chars < cfg.min_chars:
            return f"shorter than --min-chars {cfg.min_chars}"
        if cfg.max_chars is not None and chars > cfg.max_chars:
            return f"longer than --max-chars {cfg.max_chars}"
        if self.tok is not None:
            n = len(self.tok(text.replace("\x1f", "\n"), add_special_tokens=False)["input_ids"])
            if cfg.min_tokens is not None and n < cfg.min_tokens:
                return f"fewer than --min-tokens {cfg.min_tokens}"
            if cfg.max_tokens is not None and n > cfg.max_tokens:
                return f"more than --max-tokens {cfg.max_tokens}"
        if cfg.max_repetition < 1 and repetition_ratio(text) > cfg.max_repetition:
            return f"repetition above --max-repetition {cfg.max_repetition}"
        if cfg.max_symbol_ratio < 1 and symbol_ratio(text) > cfg.max_symbol_ratio:
            return f"symbol ratio above --max-symbol-ratio {cfg.max_symbol_ratio}"
        return None


class _Cleaner:
    """The per-row decisions of one clean run, and the report they fill."""

    def __init__(self, cfg: CleanConfig, schema: str, report: DataReport, exact: ExactIndex | None,
                 near: NearDupIndex | None):
        self.cfg, self.schema, self.report = cfg, schema, report
        self.filter = _RowFilter(cfg)
        self.exact, self.near = exact, near

    def check(self, rec: Any, line: int) -> None:
        """A trainer-readable row (``file:line: field`` error otherwise); raw tables are not checked."""
        if not self.cfg.columns:
            normalise(rec, self.schema, self.cfg.source, line)

    def clean(self, rec: Any, line: int) -> Any | None:
        """The cleaned record, or None when it is dropped (the reason goes to the report)."""
        where = f"line {line}"
        changed = False
        for name, container, key in text_slots(rec, self.schema, self.cfg.columns):
            new, fixes = clean_text(container[key], normal_form=self.cfg.normal_form, html_=self.cfg.strip_html)
            for fix in fixes:
                self.report.note(f"fixed: {fix}", f"{where} {name}: {container[key]!r} -> {new!r}")
            changed |= bool(fixes)
            container[key] = new
        self.report.counts["changed"] += changed
        text = row_text(rec, self.schema, self.cfg.columns)
        try:
            self.check(rec, line)
        except DataError as e:
            return self._drop("invalid after cleaning", e.message)
        reason = self.filter.reason(text)
        if reason:
            return self._drop(reason, f"{where}: {text}")
        if self.filter.language is not None:
            detected = self.filter.language.rejects(text.replace("\x1f", "\n"))
            if detected:
                return self._drop("language", f"{where}: {detected}: {text}")
        return self._unless_duplicate(rec, line, text)

    def _unless_duplicate(self, rec: Any, line: int, text: str) -> Any | None:
        if self.exact is not None:
            first = self.exact.first_of(text, line)
            if first is not None:
                return self._drop("exact duplicate", f"line {line} = line {first}: {text}")
        if self.near is not None:
            signature = self.near.signature(text)
            hit = self.near.find(signature)
            if hit is not None:
                return self._drop("near duplicate", f"line {line} ~ line {hit[0]} (Jaccard ~{hit[1]:.2f}): {text}")
            self.near.add(line, signature)
        return rec

    def _drop(self, reason: str, example: str) -> None:
        self.report.note(f"dropped: {reason}", example)
        self.report.counts["dropped"] += 1
        return None


def _clean_rows(cleaner: _Cleaner, source: Path, output: Path) -> None:
    """Stream ``source`` through ``cleaner`` into ``output``, counting rows in the report."""
    cfg, report = cleaner.cfg, cleaner.report
    with jsonl_output(output) as out:
        for line, rec in read_records(source, skip_bad=cfg.skip_bad_rows, on_bad=report.skip):
            report.counts["read"] += 1
            try:
                cleaner.check(rec, line)
            except DataError as e:
                if not cfg.skip_bad_rows:
                    raise
                report.skip("bad row", e.message)
                continue
            kept = cleaner.clean(rec, line)
            if kept is not None:
                out.write(kept)
        report.counts["written"] = out.rows


def clean_file(cfg: CleanConfig) -> DataReport:
    """Clean ``cfg.source`` into ``cfg.output`` (JSON Lines) and write ``OUTPUT.report.{json,md}``."""
    cfg.validate()
    source = check_input(cfg.source)
    output = check_output(source, cfg.output, overwrite=cfg.overwrite)
    schema = "columns" if cfg.columns else first_schema(source, cfg.schema, skip_bad=cfg.skip_bad_rows)
    report = DataReport("clean", str(source), options={k: str(v) for k, v in asdict(cfg).items()})
    report.figures["schema"] = schema
    output.parent.mkdir(parents=True, exist_ok=True)
    # The duplicate indexes' databases go next to the output.
    with open_indexes(output.parent, exact=cfg.dedup, near=cfg.near_dup, threshold=cfg.near_dup_threshold,
                      num_perm=cfg.num_perm) as (exact, near):
        _clean_rows(_Cleaner(cfg, schema, report, exact, near), source, output)
    report.outputs = [str(output)]
    paths = report.write(report_prefix(output))
    say(f"clean: {report.counts['read']:,} rows read, {report.counts['written']:,} written, "
        f"{report.counts['dropped']:,} dropped, {report.counts['skipped_bad']:,} bad rows skipped; report {paths[1]}")
    return report

