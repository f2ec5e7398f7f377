"""``edgeft data``: cleaning fixes planted HTML, control characters and mixed normalisation; exact and
near duplicates are found while a distinct pair just under the threshold is kept; split never leaks a
row or a near duplicate; convert round-trips every trainer schema through ``load_rows``; stats counts
tokens as training does; bad rows fail with one line, or are skipped and reported. Inputs never change.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.core.rows import load_rows
from edgeft.datatools.dedup import shingles
from edgeft.datatools.textclean import clean_text, dedup_text

BASE = ("The new kettle boils water quickly, keeps it warm for an hour and switches off "
        "by itself when the jug is lifted from its base, which I like a lot.")
NEAR = BASE.replace("an hour", "one hour")  # one phrase changed
# Two phrases changed: same topic, estimated similarity just under the 0.8 threshold.
DISTINCT = BASE.replace("keeps it warm for an hour", "keeps it hot for two hours").replace("I like", "we enjoy")


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def invoke(*args: str):
    return CliRunner().invoke(cli, ["data", *map(str, args)])


def test_clean_text_fixes_html_controls_and_normalisation():
    text, fixes = clean_text("<p>Caf\u00e9 &amp; \uff26\uff35\uff2c\uff2c  \ufb01le</p>\x07<br>line\u200b two   ")
    assert text == "Café & FULL file\n\nline two"  # </p> and <br> each end a line
    assert fixes == ["unicode normalised", "html stripped", "control characters removed", "whitespace normalised"]
    assert clean_text("plain text")[1] == []
    assert clean_text("a < b and c > d")[0] == "a < b and c > d"  # not HTML: left alone
    assert dedup_text("  Hello   WORLD ") == dedup_text("hello world")


def test_clean_drops_planted_duplicates_and_keeps_a_pair_under_the_threshold(tmp_path):
    assert jaccard(BASE, NEAR) >= 0.85
    assert 0.6 <= jaccard(BASE, DISTINCT) < 0.8
    rows = [{"instruction": "Review", "input": BASE, "output": "positive"},                      # line 1
            {"instruction": "review", "input": "  " + BASE.upper() + " ", "output": "POSITIVE"},  # 2: exact dup
            {"instruction": "Review", "input": NEAR, "output": "positive"},                       # 3: near dup
            {"instruction": "Review", "input": DISTINCT, "output": "positive"},                   # 4: kept
            {"instruction": "<b>Say</b> hi", "input": "x\x00y", "output": "hi"},                  # 5: NUL: bad row
            {"instruction": "Echo", "input": "\u00a7\u00a7\u00a7 ### @@@ ~~~", "output": "%%%"},  # 6: symbols
            {"instruction": "<b>Greet</b>\x1b the   user", "output": "\uff48\uff49"}]             # 7: fixed, kept
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    before = src.read_bytes()
    r = invoke("clean", src, "--output", tmp_path / "out.jsonl")
    assert r.exit_code == 1 and "in.jsonl:5: field 'input' contains a NUL character" in r.output
    assert not (tmp_path / "out.jsonl").exists()

    r = invoke("clean", src, "--output", tmp_path / "out.jsonl", "--skip-bad-rows")
    assert r.exit_code == 0, r.output
    kept = read_jsonl(tmp_path / "out.jsonl")
    assert [row["input"] if "input" in row else row["instruction"] for row in kept] == [BASE, DISTINCT, "Greet the user"]
    assert kept[2]["output"] == "hi"
    report = json.loads((tmp_path / "out.report.json").read_text())
    reasons = report["reasons"]
    assert reasons["dropped: exact duplicate"] == 1 and reasons["dropped: near duplicate"] == 1
    assert reasons["skipped: bad row"] == 1 and reasons["dropped: symbol ratio above --max-symbol-ratio 0.5"] == 1
    assert reasons["fixed: html stripped"] == 1 and reasons["fixed: control characters removed"] == 1
    assert report["counts"] == {"read": 7, "changed": 2, "dropped": 3, "skipped_bad": 1, "written": 3}
    assert report["examples"]["dropped: near duplicate"][0].startswith("line 3 ~ line 1")
    assert "| dropped: exact duplicate | 1 |" in (tmp_path / "out.report.md").read_text()
    assert src.read_bytes() == before
    load_rows(tmp_path / "out.jsonl")  # the trainer reads the output

    r = invoke("clean", src, "--output", src, "--overwrite")
    assert r.exit_code == 1 and "never modifies its input" in r.output


def test_clean_near_dup_threshold_is_configurable(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": BASE}, {"text": DISTINCT}])
    assert invoke("clean", src, "--output", tmp_path / "a.jsonl").exit_code == 0
    assert len(read_jsonl(tmp_path / "a.jsonl")) == 2
    assert invoke("clean", src, "--output", tmp_path / "b.jsonl", "--near-dup-threshold", "0.5").exit_code == 0
    assert len(read_jsonl(tmp_path / "b.jsonl")) == 1


def test_duplicate_indexes_on_disk_agree_with_datasketch(tmp_path, monkeypatch):
    import random

    import numpy as np
    from datasketch import MinHashLSH

    from edgeft.datatools import dedup

    monkeypatch.setattr(dedup, "BATCH_WRITES", 7)  # many commits: rows are found across transactions
    rng = random.Random(1)
    words = BASE.replace(",", "").replace(".", "").split()
    texts = [" ".join(rng.choice(words) for _ in range(25)) for _ in range(60)]
    texts += [t.replace(t.split()[3], "kettles", 1) for t in texts[:20]]  # near duplicates of the first 20
    reference, reference_sigs = MinHashLSH(threshold=0.8, num_perm=128), {}  # datasketch's in-memory LSH
    with dedup.NearDupIndex(directory=tmp_path) as near, dedup.ExactIndex(tmp_path) as exact:
        assert (near.bands, near.rows_per_band) == (reference.b, reference.r)
        assert len(list(tmp_path.glob("edgeft-dedup-*/index.sqlite"))) == 2
        for i, text in enumerate(texts):
            sig = near.signature(text)
            similar = {c: float(np.mean(reference_sigs[c] == sig.hashvalues)) for c in reference.query(sig)}
            expected = {c: j for c, j in similar.items() if j >= 0.8}
            hit = near.find(sig)
            if expected:
                assert hit is not None and hit[1] == max(expected.values()) and hit[0] in expected, i
            else:
                assert hit is None, i
                near.add(i, sig)
                reference.insert(i, sig)
                reference_sigs[i] = sig.hashvalues.copy()
            assert exact.first_of(text.upper(), i) is None and exact.first_of(" " + text, i + 1000) == i
        assert sum(i >= 60 for i in reference_sigs) <= 2  # (almost) every planted near duplicate was found
    assert list(tmp_path.iterdir()) == []  # closing removed the databases

def test_clean_language_filter_keeps_only_the_named_languages(tmp_path):
    rows = [{"text": "The new kettle boils water quickly and switches itself off when the jug is lifted."},
            {"text": "La nouvelle bouilloire fait bouillir l'eau rapidement et s'éteint toute seule."},
            {"text": "Der neue Wasserkocher kocht das Wasser schnell und schaltet sich von selbst ab."},
            {"text": "My daughter loves the bright colours and the strap is strong enough for school."},
            {"text": "Je recommande ce produit à tous mes amis, la livraison était très rapide."}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    r = invoke("clean", src, "--output", tmp_path / "en.jsonl", "--language", "en")
    assert r.exit_code == 0, r.output
    assert read_jsonl(tmp_path / "en.jsonl") == [rows[0], rows[3]]
    report = json.loads((tmp_path / "en.report.json").read_text())
    assert report["reasons"]["dropped: language"] == 3 and report["counts"]["dropped"] == 3
    assert report["examples"]["dropped: language"][0].startswith("line 2: detected fr (")
    assert "| dropped: language | 3 |" in (tmp_path / "en.report.md").read_text()

    assert invoke("clean", src, "--output", tmp_path / "fr_de.jsonl", "--language", "fr,de").exit_code == 0
    assert read_jsonl(tmp_path / "fr_de.jsonl") == [rows[1], rows[2], rows[4]]
    assert invoke("clean", src, "--output", tmp_path / "none.jsonl", "--language", "en",
                  "--min-language-confidence", "1").exit_code == 0
    assert read_jsonl(tmp_path / "none.jsonl") == []  # no detection is that certain

    r = invoke("clean", src, "--output", tmp_path / "x.jsonl", "--language", "xx1")
    assert r.exit_code == 2 and "--language: unknown ISO 639-1 code(s) xx1" in r.output  # a ConfigError
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x.jsonl").exists()


def _split_rows() -> list[dict]:
    import random

    rng = random.Random(0)
    words = "apple river stone cloud quick green small table music light paper window orange silver".split()
    rows = []
    for i in range(60):
        label = ["positive", "negative", "neutral"][i % 3]
        rows.append({"instruction": " ".join(rng.choice(words) for _ in range(12)), "output": label})
    rows += [dict(rows[0]), dict(rows[5])]  # exact duplicates
    rows.append({"instruction": rows[9]["instruction"] + "!", "output": rows[9]["output"]})  # near duplicate
    return rows


def test_split_never_leaks_and_stratifies(tmp_path):
    src = write_jsonl(tmp_path / "all.jsonl", _split_rows())
    r = invoke("split", src, "--output", tmp_path / "s", "--eval", "0.2", "--test", "0.2", "--seed", "3",
               "--stratify", "output")
    assert r.exit_code == 0, r.output
    parts = {s: read_jsonl(tmp_path / "s" / f"{s}.jsonl") for s in ("train", "eval", "test")}
    assert sum(map(len, parts.values())) == 63
    texts = {s: {dedup_text(row["instruction"]) for row in rows} for s, rows in parts.items()}
    for a in parts:
        for b in parts:
            if a < b:
                assert not texts[a] & texts[b]
                assert all(jaccard(x, y) < 0.9 for x in texts[a] for y in texts[b])  # estimates err ~0.04
    for split, n in (("eval", 4), ("test", 4)):
        counts = {lab: sum(row["output"] == lab for row in parts[split]) for lab in ("positive", "negative", "neutral")}
        assert all(abs(c - n) <= 1 for c in counts.values()), (split, counts)
    report = json.loads((tmp_path / "s" / "split.report.json").read_text())
    assert report["reasons"]["kept together: exact duplicate"] == 2
    assert report["reasons"]["kept together: near duplicate"] == 1
    again = tmp_path / "s2"
    assert invoke("split", src, "--output", again, "--eval", "0.2", "--test", "0.2", "--seed", "3",
                  "--stratify", "output").exit_code == 0
    assert (again / "eval.jsonl").read_bytes() == (tmp_path / "s" / "eval.jsonl").read_bytes()

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b", "label": 1}, {"instruction": "c", "output": "d"}])
    r = invoke("split", bad, "--output", tmp_path / "s3", "--stratify", "label")
    assert r.exit_code == 1 and "bad.jsonl:2: missing field 'label' (--stratify)" in r.output


SOURCES = {
    "instruction": {"system": "Be brief.", "instruction": "Add 2 and 3", "output": "5"},
    "chat": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Name a colour"}, {"from": "gpt", "value": "red"}]},
    "prompt-completion": {"prompt": "2+2=", "completion": "4"},
}


def _pairs(row) -> tuple:
    """A row's content independent of its schema: (system, prompt, answer)."""
    if row.prompt is not None:
        return (None, row.prompt, row.completion)
    msgs = row.messages
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    rest = msgs[1:] if system else msgs
    return (system, rest[0]["content"], rest[1]["content"])


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_convert_round_trips_every_schema(tmp_path, source):
    src = write_jsonl(tmp_path / "src.jsonl", [SOURCES[source]])
    original = _pairs(load_rows(src)[0][0])
    for target in ("instruction", "chat", "sharegpt", "prompt-completion", "text"):
        out = tmp_path / f"{target}.jsonl"
        r = invoke("convert", src, "--to", target, "--output", out)
        if target == "prompt-completion" and original[0] is not None:
            assert r.exit_code == 1 and "system message does not fit prompt-completion" in r.output
            continue
        assert r.exit_code == 0, r.output
        rows, report = load_rows(out)
        assert report.schema == target
        if target == "text":
            assert original[1] in rows[0].text and rows[0].text.endswith(original[2])
            continue
        assert _pairs(rows[0]) == original
        back = tmp_path / f"{target}.back.jsonl"
        assert invoke("convert", out, "--to", source, "--output", back).exit_code == 0
        assert read_jsonl(back) == [SOURCES[source]] or _pairs(load_rows(back)[0][0]) == original


def test_convert_csv_with_template_and_label_map(tmp_path):
    src = tmp_path / "sst.tsv"
    with open(src, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerows([["sentence", "label"], ["a great film", "1"], ["dull and long", "0"], ["fine", "2"]])
    out = tmp_path / "sst.jsonl"
    args = ["convert", src, "--to", "instruction", "--output", out, "--template", "Classify the sentiment: {sentence}",
            "--output-col", "label", "--label-map", "0=negative,1=positive"]
    r = invoke(*args)
    assert r.exit_code == 1 and "sst.tsv:4: field 'label': value '2' is not in --label-map" in r.output
    r = invoke(*args, "--skip-bad-rows")
    assert r.exit_code == 0, r.output
    assert read_jsonl(out) == [{"instruction": "Classify the sentiment: a great film", "output": "positive"},
                               {"instruction": "Classify the sentiment: dull and long", "output": "negative"}]
    report = json.loads((tmp_path / "sst.report.json").read_text())
    assert report["figures"]["labels"] == {"positive": 1, "negative": 1} and report["counts"]["skipped_bad"] == 1
    r = invoke("convert", src, "--to", "chat", "--output", tmp_path / "x.jsonl", "--template", "{missing}",
               "--output-col", "label")
    assert r.exit_code == 1 and "sst.tsv:2: --template names column 'missing'" in r.output
    r = invoke("convert", src, "--to", "chat", "--output", tmp_path / "x.jsonl", "--label-map", "0")
    assert r.exit_code == 2 or r.exit_code == 1
    assert "--label-map" in r.output


def test_stats_counts_tokens_as_training_does(tmp_path, smol_tokenizer_dir):
    from transformers import AutoTokenizer

    from edgeft.data import tokenize_row

    rows = [{"instruction": f"Colour of item {i}?" + " very" * (i * 10), "output": ["red", "blue"][i % 2]}
            for i in range(6)]
    rows.append(dict(rows[0]))
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    r = invoke("stats", src, "--model", smol_tokenizer_dir, "--max-seq-len", "64", "--label-field", "output",
               "--output", tmp_path / "st")
    assert r.exit_code == 0, r.output
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    lengths = [len(tokenize_row(tok, row)[0]) for row in load_rows(src)[0]]
    report = json.loads((tmp_path / "st" / "stats.report.json").read_text())
    figs = report["figures"]
    assert report["counts"]["rows"] == 7 and figs["schema"] == "instruction"
    assert figs["tokens"]["max"] == max(lengths) and figs["tokens"]["min"] == min(lengths)
    assert figs["truncated_at_max_seq_len"]["rows"] == sum(n > 64 for n in lengths)
    assert figs["labels"] == {"red": 4, "blue": 3} and figs["exact_duplicates"] == 1
    assert (tmp_path / "st" / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"
