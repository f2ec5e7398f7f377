"""Fuzz the data loader: thousands of malformed rows never crash it; each rejection names its line."""

from __future__ import annotations

import json
import random

import pytest

from edgeft.core.rows import load_rows
from edgeft.core.errors import DataError

N_ROWS = 3000


def _junk_value(rng: random.Random):
    return rng.choice([
        None, "", "   ", 0, -1, 3.5, True, [], {}, ["x"], {"a": 1}, "x" * rng.randint(1, 50),
        "\x00nul", "\x1b[31mred\x1b[0m", "tab\tnew\nline", "\u2028sep", "émoji 🎉",
        "x" * 1_000_001, [{"role": "user"}], [{"role": "assistant", "content": 5}],
    ])


def _row(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return "{" + "x" * rng.randint(0, 20)  # broken JSON
    if kind == 1:
        return json.dumps(_junk_value(rng))  # not an object
    if kind == 2:
        return json.dumps({"instruction": _junk_value(rng), "output": _junk_value(rng)})
    if kind == 3:
        return json.dumps({"messages": _junk_value(rng)})
    if kind == 4:
        msgs = [{"role": rng.choice(["user", "assistant", "system", "robot", None, 3]), "content": _junk_value(rng)}
                for _ in range(rng.randint(0, 4))]
        return json.dumps({"messages": msgs})
    if kind == 5:
        return json.dumps({"prompt": _junk_value(rng), "completion": _junk_value(rng)})
    if kind == 6:
        return json.dumps({"instruction": "ok", "output": "fine"})  # a good row now and then
    return json.dumps({rng.choice(["text", "foo", "conversations"]): _junk_value(rng)})


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_rows_never_crash_and_are_reported_by_line(tmp_path, seed):
    rng = random.Random(seed)
    p = tmp_path / "fuzz.jsonl"
    # The first row fixes the schema (instruction); the rest are mostly junk.
    lines = [json.dumps({"instruction": "seed", "output": "row"})] + [_row(rng) for _ in range(N_ROWS)]
    p.write_text("\n".join(lines) + "\n")
    rows, report = load_rows(p, skip_bad=True)
    good_lines = {r.line for r in rows}
    bad_lines = {int(msg.split(":")[1]) for msg in report.skipped}
    assert all(msg.startswith(f"{p}:") for msg in report.skipped)
    assert good_lines.isdisjoint(bad_lines)
    assert good_lines | bad_lines == set(range(1, len(lines) + 1))  # every line accounted for
    assert len(rows) >= 1 and len(report.skipped) > N_ROWS // 2
    for r in rows:  # what survives is well-formed
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in r.messages)

    # Without --skip-bad-rows the first bad row stops the load with a one-line error naming it.
    with pytest.raises(DataError) as e:
        load_rows(p)
    first_bad = min(bad_lines)
    assert e.value.message.startswith(f"{p}:{first_bad}:") and "\n" not in e.value.message


def test_fifty_megabyte_single_line(tmp_path):
    p = tmp_path / "huge.jsonl"
    with open(p, "w") as fh:
        fh.write(json.dumps({"text": "a" * (50 * 2**20)}) + "\n")
        fh.write(json.dumps({"text": "fine"}) + "\n")
    with pytest.raises(DataError, match=r"huge.jsonl:1: field 'text' is 52,428,800 characters"):
        load_rows(p)
    rows, report = load_rows(p, skip_bad=True)
    assert [r.text for r in rows] == ["fine"] and len(report.skipped) == 1
