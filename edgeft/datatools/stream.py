"""Streaming access to data files for ``edgeft data``: records one at a time with their line numbers
(JSON Lines and CSV/TSV are never read whole), the text fields of each schema, and output paths
that can never be the input.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeft.core.errors import DataError, EdgeftError
from edgeft.core.rows import LoadReport, detect_schema, iter_records

TABLE_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
OnBad = Callable[[str, str], None]  # (reason, "file:line: message") for a skipped row


def check_input(path: Path, flag: str = "FILE") -> Path:
    """``path`` as an existing data file, or a one-line error naming ``flag``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag} {path}: file not found")
    if path.suffix.lower() not in (*TABLE_SUFFIXES, *JSONL_SUFFIXES, ".json"):
        raise DataError(f"{flag} {path}: unsupported file type '{path.suffix}' (use .jsonl, .json, .csv or .tsv)")
    return path


def check_output(source: Path, output: Path, *, overwrite: bool, flag: str = "--output") -> Path:
    """Refuse an output that is the input (inputs are never modified) or exists without ``overwrite``."""
    output = Path(output)
    if output.exists() and output.resolve() == Path(source).resolve():
        raise EdgeftError(f"{flag} {output}: is the input file; edgeft data never modifies its input")
    if output.exists() and not overwrite:
        raise EdgeftError(f"{flag} {output} exists; pass --overwrite to replace it")
    return output


def _iter_table(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """CSV/TSV rows as dicts, read line by line (the header names the fields)."""
    csv.field_size_limit(2**31 - 1)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        try:
            if not reader.fieldnames:
                raise DataError(f"{path}:1: no header row")
            for rec in reader:
                if rec.get(None):
                    raise DataError(f"{path}:{reader.line_num}: more fields than header columns")
                yield reader.line_num, rec
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{reader.line_num + 1}: invalid UTF-8 at byte {e.start} of the line") from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: {e}") from None


def read_records(path: Path, *, skip_bad: bool, on_bad: OnBad) -> Iterator[tuple[int, Any]]:
    """(line, record) of every row. A row that cannot be parsed stops the stream with a
    ``file:line`` error, or with ``skip_bad`` is passed to ``on_bad`` and skipped.

    JSON Lines and CSV/TSV stream; a ``.json`` array is parsed whole (JSON has no row boundaries).
    """
    if path.suffix.lower() in TABLE_SUFFIXES:
        yield from _iter_table(path)  # a broken CSV quote breaks every later row too: always stop
        return
    log = LoadReport(path=str(path), schema="auto")
    for line, rec in iter_records(path, skip_bad=skip_bad, report=log):
        for message in log.skipped:
            on_bad("unreadable row", message)
        log.skipped.clear()
        yield line, rec
    for message in log.skipped:
        on_bad("unreadable row", message)


def first_schema(path: Path, schema: str, *, skip_bad: bool) -> str:
    """``schema`` if given, else the schema of the first readable row."""
    if schema != "auto":
        return schema
    for line, rec in read_records(path, skip_bad=skip_bad, on_bad=lambda *_: None):
        return detect_schema(rec, path, line)
    raise DataError(f"{path}: no rows")


# Where each schema keeps its text: top-level string fields, and (list field, text key) for turns.
SCHEMA_TEXT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, str] | None]] = {
    "instruction": (("system", "instruction", "input", "output"), None),
    "chat": ((), ("messages", "content")),
    "sharegpt": ((), ("conversations", "value")),
    "prompt-completion": (("prompt", "completion"), None),
    "text": (("text",), None),
}


def text_slots(rec: Any, schema: str, columns: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """The (field name, container, key) of every string a row of ``schema`` holds, in order.

    ``columns`` overrides the schema (raw tables: the named columns). Non-string values are left out.
    """
    if not isinstance(rec, dict):
        return []
    names, turns = (columns, None) if columns else SCHEMA_TEXT_FIELDS.get(schema, ((), None))
    slots = [(name, rec, name) for name in names if isinstance(rec.get(name), str)]
    if turns is not None and isinstance(rec.get(turns[0]), list):
        list_name, key = turns
        for i, turn in enumerate(rec[list_name]):
            if isinstance(turn, dict) and isinstance(turn.get(key), str):
                slots.append((f"{list_name}[{i}].{key}", turn, key))
    return slots


def row_text(rec: Any, schema: str, columns: tuple[str, ...] = ()) -> str:
    """All of a row's text joined with a unit separator (what dedup and length filters look at)."""
    return "\x1f".join(container[key] for _, container, key in text_slots(rec, schema, columns))
