"""``edgeft data convert``: rows of any readable schema, or raw CSV/TSV/JSONL columns put through a
prompt template (``--template "Classify: {sentence}" --output-col label --label-map 0=negative,...``),
written as one of the schemas the trainer reads (instruction, chat, sharegpt, prompt-completion, text).
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeft.core.errors import ConfigError, DataError
from edgeft.core.progress import say
from edgeft.core.rows import Row, detect_schema, normalise
from edgeft.datatools.report import DataReport, report_prefix
from edgeft.datatools.stream import check_input, check_output, read_records
from edgeft.datatools.writer import jsonl_output

TARGETS = ("instruction", "chat", "sharegpt", "prompt-completion", "text")
_SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def parse_label_map(text: str | None) -> dict[str, str]:
    """``"0=negative,1=positive"`` -> {"0": "negative", "1": "positive"} (ConfigError naming the flag)."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--label-map: '{item}' is not VALUE=LABEL (e.g. 0=negative,1=positive)")
        out[key.strip()] = value.strip()
    return out


@dataclass
class ConvertConfig:
    source: Path
    output: Path
    to: str
    overwrite: bool = False
    schema: str = "auto"
    template: str | None = None
    output_col: str | None = None
    label_map: dict[str, str] = field(default_factory=dict)
    system: str | None = None
    skip_bad_rows: bool = False

    def validate(self) -> None:
        p = []
        if self.to not in TARGETS:
            p.append(f"--to must be one of {', '.join(TARGETS)}")
        if (self.template is None) != (self.output_col is None):
            p.append("--template and --output-col go together (the prompt and the answer column)")
        if self.label_map and self.output_col is None:
            p.append("--label-map needs --template and --output-col")
        if self.template is not None:
            try:
                names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
            except ValueError as e:
                names = []
                p.append(f"--template: {e}")
            if not names and self.template is not None:
                p.append("--template names no column (use {column} placeholders)")
        if p:
            raise ConfigError("; ".join(p))


def templated_row(rec: Any, cfg: ConvertConfig, where: str) -> Row:
    """A one-turn chat from raw columns: the template filled from the row, the answer column mapped."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with named fields, got {type(rec).__name__}")
    try:
        prompt = cfg.template.format_map({k: "" if v is None else v for k, v in rec.items()})
    except KeyError as e:
        raise DataError(f"{where}: --template names column {e}, which the row does not have") from None
    if cfg.output_col not in rec or rec[cfg.output_col] in (None, ""):
        raise DataError(f"{where}: field '{cfg.output_col}' (--output-col) is missing or empty")
    answer = str(rec[cfg.output_col]).strip()
    if cfg.label_map:
        if answer not in cfg.label_map:
            raise DataError(f"{where}: field '{cfg.output_col}': value {answer!r} is not in --label-map")
        answer = cfg.label_map[answer]
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if cfg.system:
        messages.insert(0, {"role": "system", "content": cfg.system})
    return Row(0, messages=messages)


def _single_turn(row: Row, target: str, where: str) -> tuple[str | None, str, str]:
    """(system, prompt, answer) of a one-turn row, or a DataError saying why ``target`` cannot hold it."""
    if row.prompt is not None:
        return None, row.prompt, row.completion or ""
    msgs = row.messages or []
    system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else None
    rest = msgs[1:] if system is not None else msgs
    if [m["role"] for m in rest] != ["user", "assistant"]:
        raise DataError(f"{where}: a {len(rest)}-turn conversation does not fit {target} (one user and one "
                        "assistant turn); convert to chat or sharegpt instead")
    return system, rest[0]["content"], rest[1]["content"]


def render(row: Row, target: str, where: str) -> dict[str, Any]:
    """``row`` as a record of ``target`` schema (DataError when the schema cannot hold it)."""
    if target == "text":
        if row.text is not None:
            return {"text": row.text}
        if row.prompt is not None:
            return {"text": row.prompt + (row.completion or "")}
        return {"text": "\n\n".join(m["content"] for m in row.messages or [])}
    if row.text is not None:
        raise DataError(f"{where}: a plain-text row has no prompt and answer to write as {target}")
    if target in ("chat", "sharegpt"):
        msgs = row.messages or [{"role": "user", "content": row.prompt}, {"role": "assistant", "content": row.completion}]
        if target == "chat":
            return {"messages": msgs}
        return {"conversations": [{"from": _SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in msgs]}
    system, prompt, answer = _single_turn(row, target, where)
    if target == "instruction":
        return {**({"system": system} if system else {}), "instruction": prompt, "output": answer}
    if system:
        raise DataError(f"{where}: a system message does not fit prompt-completion; convert to instruction or chat")
    return {"prompt": prompt, "completion": answer}


def convert_file(cfg: ConvertConfig) -> DataReport:
    """Convert ``cfg.source`` into ``cfg.output`` (JSON Lines of ``cfg.to``) with a report beside it."""
    cfg.validate()
    source = check_input(cfg.source)
    output = check_output(source, cfg.output, overwrite=cfg.overwrite)
    report = DataReport("convert", str(source), options={k: str(v) for k, v in asdict(cfg).items()})
    labels: Counter = Counter()
    schema = cfg.schema

    with jsonl_output(output) as out:
        for line, rec in read_records(source, skip_bad=cfg.skip_bad_rows, on_bad=report.skip):
            report.counts["read"] += 1
            where = f"{source}:{line}"
            try:
                if cfg.template is not None:
                    row = templated_row(rec, cfg, where)
                    labels[row.messages[-1]["content"]] += 1
                else:
                    schema = detect_schema(rec, source, line) if schema == "auto" else schema
                    row = normalise(rec, schema, source, line)
                out.write(render(row, cfg.to, where))
            except DataError as e:
                if not cfg.skip_bad_rows:
                    raise
                report.skip("bad row", e.message)
        report.counts["written"] = out.rows
    report.figures.update({"from": "template" if cfg.template else schema, "to": cfg.to})
    if labels:
        report.figures["labels"] = dict(labels.most_common())
    report.outputs = [str(output)]
    paths = report.write(report_prefix(output))
    say(f"convert: {report.counts['written']:,} of {report.counts['read']:,} rows written as {cfg.to}; report {paths[1]}")
    return report
