"""Data readers, schema checks and response-only labels."""

from __future__ import annotations

import json

import pytest

from edgeft.data import IGNORE_INDEX, pack, tokenize_row, tokenize_rows, Tokenized
from edgeft.core.rows import Row, load_rows
from edgeft.core.errors import DataError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_schemas_detected_and_normalised(tmp_path):
    cases = {
        "a.jsonl": ('{"instruction": "Add", "input": "1 2", "output": "3"}\n', "instruction"),
        "b.jsonl": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n', "chat"),
        "c.jsonl": ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n', "sharegpt"),
        "d.jsonl": ('{"prompt": "2+2=", "completion": "4"}\n', "prompt-completion"),
        "e.jsonl": ('{"text": "plain text"}\n', "text"),
        "f.csv": ("instruction,input,output\nAdd,1 2,3\n", "instruction"),
        "g.tsv": ("prompt\tcompletion\n2+2=\t4\n", "prompt-completion"),
        "h.json": ('[\n  {"text": "one"},\n  {"text": "two"}\n]\n', "text"),
    }
    for name, (content, schema) in cases.items():
        rows, report = load_rows(write(tmp_path / name, content))
        assert report.schema == schema, name
    rows, _ = load_rows(tmp_path / "a.jsonl")
    assert rows[0].messages == [{"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}]
    rows, _ = load_rows(tmp_path / "c.jsonl")
    assert [m["role"] for m in rows[0].messages] == ["user", "assistant"]
    rows, _ = load_rows(tmp_path / "h.json")
    assert [r.line for r in rows] == [2, 3]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n', "bad.jsonl:2: missing field 'output'"),
        ('{"instruction": "x", "output": ""}\n', "bad.jsonl:1: field 'output' is empty"),
        ('{"foo": 1}\n', "bad.jsonl:1: unknown schema (fields: foo)"),
        ('{"text": "a"}\n{not json\n', "bad.jsonl:2: invalid JSON"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}\n', "bad.jsonl:1: messages[0].role: unknown role 'wizard'"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', "bad.jsonl:1: field 'messages' has no assistant turn"),
        ('{"text": 5}\n', "bad.jsonl:1: field 'text' must be a string, got int"),
        ("[" * 100000 + "]" * 100000 + "\n", "bad.jsonl:1: JSON nested too deeply"),
        ("\n\n", "bad.jsonl: no usable rows"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, content, message):
    with pytest.raises(DataError) as e:
        load_rows(write(tmp_path / "bad.jsonl", content))
    assert message in e.value.message


def test_invalid_utf8_names_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid UTF-8"):
        load_rows(p)


def test_skip_bad_rows_keeps_good_ones_and_counts(tmp_path):
    p = write(tmp_path / "mixed.jsonl", '{"text": "a"}\n{"text": ""}\n{oops\n{"text": "b"}\n')
    rows, report = load_rows(p, skip_bad=True)
    assert [r.text for r in rows] == ["a", "b"]
    assert len(report.skipped) == 2 and "mixed.jsonl:2" in report.skipped[0] and "mixed.jsonl:3" in report.skipped[1]


def test_chat_labels_cover_only_assistant_turns(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    row = Row(1, messages=[{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello there"},
                           {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hi again"}])
    ids, labels = tokenize_row(tok, row)
    target_text = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert target_text == "Hello there<|im_end|>\nHi again<|im_end|>\n"
    assert "Say hi" not in target_text and "system" not in target_text


def test_named_chat_templates_render_the_default(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    row = Row(1, messages=[{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello"}])
    want = tokenize_row(tok, row)
    tok.chat_template = {"default": tok.chat_template, "tool_use": "{{ 'tools' }}"}  # as a multi-template config loads
    assert tokenize_row(tok, row) == want


def test_prompt_completion_and_text_labels(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    ids, labels = tokenize_row(tok, Row(1, prompt="2+2=", completion="4"))
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "4" + tok.eos_token
    ids, labels = tokenize_row(tok, Row(1, text="hello world"))
    assert labels == ids and ids[-1] == tok.eos_token_id


def test_truncation_counted_and_empty_targets_dropped(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    rows = [Row(1, prompt="word " * 50, completion="end"), Row(2, text="a " * 50), Row(3, prompt="hi", completion="there")]
    out, stats = tokenize_rows(tok, rows, max_seq_len=20)
    assert stats.truncated == 2 and stats.dropped_no_target == 1 and stats.examples == 2
    assert all(len(ex.input_ids) <= 20 for ex in out)


def test_pack_keeps_rows_whole_and_within_length():
    exs = [Tokenized(list(range(n)), list(range(n)), i) for i, n in enumerate([5, 9, 3, 7, 2, 6])]
    bins = pack(exs, 10)
    assert sorted(len(e.input_ids) for b in bins for e in b) == [2, 3, 5, 6, 7, 9]
    assert all(sum(len(e.input_ids) for e in b) <= 10 for b in bins)
    assert len(bins) == 4
