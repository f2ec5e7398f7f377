"""Rows of a data file: read, check and normalise them (no tokenizer, nothing heavy).

Readers report problems as ``file:line: field ...``. Rows are normalised to one of three
shapes: a chat (list of role/content messages), a prompt/completion pair, or plain text.
Training (``edgeft.data``) tokenises them; the runtime reads evaluation rows with the same code.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from edgeft.core.errors import DataError

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MAX_FIELD_CHARS = 1_000_000  # a single field longer than this is almost surely broken data

# ChatML, used when a tokenizer has no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Row:
    """One normalised example. Exactly one of messages / (prompt, completion) / text is set."""

    line: int
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    task: str | None = None  # the row's optional ``task`` field (multi-task data)


@dataclass
class LoadReport:
    path: str
    schema: str
    rows: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"


# ---------------------------------------------------------------------------------------------
# Reading files


def _line_of(raw: bytes, offset: int) -> int:
    return raw.count(b"\n", 0, offset) + 1


def _decode_line(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{line}: invalid UTF-8 at byte {e.start}") from None


def _parse_json(text: str, path: Path, line: int) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{path}:{line}: JSON nested too deeply") from None
    except ValueError as e:
        raise DataError(f"{path}:{line}: invalid JSON ({getattr(e, 'msg', e)})") from None


def iter_records(path: Path, *, skip_bad: bool, report: LoadReport) -> Iterator[tuple[int, Any]]:
    """Yield (line number, raw record) from a .jsonl/.json/.csv/.tsv file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    yield n, _parse_json(_decode_line(raw, path, n), path, n)
                except DataError as e:
                    if not skip_bad:
                        raise
                    report.skipped.append(e.message)
    elif suffix == ".json":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{_line_of(raw, e.start)}: invalid UTF-8 at byte {e.start}") from None
        yield from _iter_json_array(text, path)
    elif suffix in (".csv", ".tsv"):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{_line_of(raw, e.start)}: invalid UTF-8 at byte {e.start}") from None
        csv.field_size_limit(2**31 - 1)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise DataError(f"{path}:1: no header row")
        try:
            for rec in reader:
                if rec.get(None):
                    raise DataError(f"{path}:{reader.line_num}: more fields than header columns")
                yield reader.line_num, rec
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: {e}") from None
    else:
        raise DataError(f"--data {path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv or .tsv)")


def _iter_json_array(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array (or {"data": [...]}) with the line each starts on."""
    data = _parse_json(text, path, 1)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
        yield from ((1, rec) for rec in data)  # nested layout: element lines are not tracked
        return
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON array of objects (or JSON Lines in a .jsonl file)")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    for rec in data:
        while text[i] in " \t\r\n,":
            i += 1
        _, end = dec.raw_decode(text, i)
        yield text.count("\n", 0, i) + 1, rec
        i = end


# ---------------------------------------------------------------------------------------------
# Schemas


def detect_schema(rec: Any, path: Path, line: int) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{path}:{line}: expected an object with named fields, got {type(rec).__name__}")
    keys = set(rec)
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "instruction"
    if "prompt" in keys and "completion" in keys:
        return "prompt-completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{path}:{line}: unknown schema (fields: {', '.join(sorted(map(str, keys))) or 'none'}); expected "
        "instruction/input/output, messages, conversations, prompt/completion or text"
    )


def _text_field(rec: dict, name: str, where: str, *, required: bool = True) -> str:
    if name not in rec or rec[name] is None:
        if required:
            raise DataError(f"{where}: missing field '{name}'")
        return ""
    value = rec[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name in ("output", "completion", "input"):
        value = str(value)  # labels such as 1/0 in CSV-like JSON
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    if len(value) > MAX_FIELD_CHARS:
        raise DataError(f"{where}: field '{name}' is {len(value):,} characters (limit {MAX_FIELD_CHARS:,})")
    if "\x00" in value:
        raise DataError(f"{where}: field '{name}' contains a NUL character")
    return value


def _messages(items: Any, where: str, field_name: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: field '{field_name}' must be a non-empty list")
    out = []
    for i, m in enumerate(items):
        at = f"{where}: {field_name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at} must be an object with '{role_key}' and '{content_key}'")
        role = m.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"{at}.{role_key}: unknown role {role!r} (expected one of {', '.join(sorted(roles))})")
        content = _text_field(m, content_key, f"{at}")
        out.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field '{field_name}' has no assistant turn to learn from")
    return out


def _task(rec: dict, where: str) -> str | None:
    """The optional ``task`` field: a non-empty string naming the row's task."""
    value = rec.get("task")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field 'task' must be a non-empty string naming the row's task, got {value!r}"[:300])
    return value.strip()


def normalise(rec: Any, schema: str, path: Path, line: int) -> Row:
    where = f"{path}:{line}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(rec).__name__}")
    row = _content(rec, schema, where, line)
    row.task = _task(rec, where)
    return row


def _content(rec: dict, schema: str, where: str, line: int) -> Row:
    """The row's messages, prompt/completion or text under ``schema``."""
    if schema == "chat":
        return Row(line, messages=_messages(rec.get("messages"), where, "messages", "role", "content", {r: r for r in ROLES}))
    if schema == "sharegpt":
        return Row(line, messages=_messages(rec.get("conversations"), where, "conversations", "from", "value", SHAREGPT_ROLES))
    if schema == "instruction":
        instruction = _text_field(rec, "instruction", where)
        extra = _text_field(rec, "input", where, required=False)
        output = _text_field(rec, "output", where)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if isinstance(rec.get("system"), str) and rec["system"].strip():
            msgs.insert(0, {"role": "system", "content": rec["system"]})
        return Row(line, messages=msgs)
    if schema == "prompt-completion":
        return Row(line, prompt=_text_field(rec, "prompt", where), completion=_text_field(rec, "completion", where))
    if schema == "text":
        return Row(line, text=_text_field(rec, "text", where))
    raise DataError(f"--schema {schema}: unknown schema")


def load_rows(path: str | Path, schema: str = "auto", *, skip_bad: bool = False) -> tuple[list[Row], LoadReport]:
    """Read and check every row of ``path``. Bad rows stop the load unless ``skip_bad``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: file not found")
    report = LoadReport(path=str(path), schema=schema)
    rows: list[Row] = []
    for line, rec in iter_records(path, skip_bad=skip_bad, report=report):
        try:
            if report.schema == "auto":
                report.schema = detect_schema(rec, path, line)
            rows.append(normalise(rec, report.schema, path, line))
        except DataError as e:
            if not skip_bad:
                raise
            report.skipped.append(e.message)
    report.rows = len(rows)
    if not rows:
        hint = f" ({len(report.skipped)} bad rows skipped; first: {report.skipped[0]})" if report.skipped else ""
        raise DataError(f"{path}: no usable rows{hint}")
    return rows, report
