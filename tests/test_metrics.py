"""Task metrics: hand-checked classification and generation figures, bootstrap intervals, the
label-set rule, and ``edgeft eval`` end to end on a tiny adapter."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from runtime.taskmetrics import bleu, classification_metrics, generation_metrics, is_label_set, rouge_l, task_metrics

REFS = ["pos", "neg", "neg", "pos", "neg", "pos"]
PREDS = ["Pos.", "neg", "pos", "pos", "neg", "maybe"]  # normalised before comparison; "maybe" is outside the set


def test_classification_matches_hand_counts():
    m = classification_metrics(PREDS, REFS)
    # pos predicted on rows 0, 2, 3 (right on 0, 3); neg predicted on rows 1, 4 (both right); row 5 -> (other).
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["pos"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["neg"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["macro_precision"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["macro_recall"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["confusion"] == {"labels": ["neg", "pos", "(other)"], "matrix": [[2, 1, 0], [0, 2, 1], [0, 0, 0]]}


def test_generation_matches_hand_counts():
    # 1- to 4-gram precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty: BLEU = (0.2) ** 0.25.
    assert bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(100 * 0.2 ** 0.25, rel=1e-4)
    assert bleu(["the cat sat down"], ["the cat sat down"]) == pytest.approx(100.0)
    assert bleu(["the cat sat"], ["the cat sat"]) == 0.0  # standard corpus BLEU: no 4-gram, no score
    # Longest common subsequence "the cat sat on mat": 5 of 6 tokens each side.
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on a mat"])[0] == pytest.approx(5 / 6)
    m = generation_metrics(["The cat sat on the mat.", "a dog"], ["the cat sat on the mat", "the dog runs"])
    assert m["exact_match"] == 0.5


def test_label_set_rule_and_intervals():
    assert is_label_set(REFS) and not is_label_set(["a b", "c d", "e f", "g h"])
    m = task_metrics(PREDS, REFS, resamples=200)
    assert m["kind"] == "classification" and set(m["ci"]) == {"accuracy", "macro_precision", "macro_recall", "macro_f1"}
    for name, (low, high) in m["ci"].items():
        assert 0 <= low <= m[name] <= high <= 1, name
    assert task_metrics(PREDS, REFS, resamples=200)["ci"] == m["ci"]  # seeded
    perfect = task_metrics(REFS, REFS, resamples=200)
    assert perfect["accuracy"] == 1.0 and perfect["ci"]["accuracy"] == (1.0, 1.0)
    gen = task_metrics(["a b c d e", "x y"], ["a b c d f", "x y"], resamples=200)
    assert gen["kind"] == "generation" and gen["ci"]["exact_match"][0] <= 0.5 <= gen["ci"]["exact_match"][1]


def run_eval(adapter, rows: list[dict], out):
    """``edgeft eval`` of ``adapter`` on ``rows``: the CLI result and eval.json."""
    from edgeft.cli import cli

    data = out.parent / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = CliRunner().invoke(cli, ["eval", "--model", str(adapter), "--data", str(data), "--output", str(out),
                                 "--answer-tokens", "4", "--threads", "1", "--resamples", "100"])
    assert r.exit_code == 0, r.output
    return r, json.loads((out / "eval.json").read_text())


def test_eval_command_on_a_tiny_adapter(tmp_path, tiny_lora_adapter):
    out = tmp_path / "ev"
    _, result = run_eval(tiny_lora_adapter, [{"instruction": f"Colour of item {i}?", "output": ["red", "blue"][i % 2]}
                                             for i in range(6)], out)
    m = result["task_metrics"]
    assert result["rows"] == 6 and m["kind"] == "classification" and result["perplexity"] > 1
    refs = [a["reference"] for a in result["answers"]]
    preds = [a["generated"] for a in result["answers"]]
    assert m["accuracy"] == classification_metrics(preds, refs)["accuracy"]
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Task metrics" in (out / "eval.md").read_text()


def test_metrics_by_task_score_each_tasks_rows_on_their_own():
    from runtime.taskmetrics import NO_TASK, metrics_by_task

    preds = PREDS + ["a b c d e", "x y", "free"]
    refs = REFS + ["a b c d f", "x y", "text"]
    tasks = ["sentiment"] * 6 + ["summary", "summary", None]
    by_task = metrics_by_task(preds, refs, tasks, resamples=200)
    assert list(by_task) == [NO_TASK, "sentiment", "summary"]
    assert by_task["sentiment"] == task_metrics(PREDS, REFS, resamples=200)  # labels: accuracy 4/6 with its interval
    assert by_task["sentiment"]["accuracy"] == pytest.approx(4 / 6)
    assert by_task["summary"]["kind"] == "generation" and by_task["summary"]["exact_match"] == 0.5
    assert by_task[NO_TASK]["rows"] == 1
    assert metrics_by_task(PREDS, REFS, [None] * 6) is None


def _two_task_rows() -> list[dict]:
    rows = [{"instruction": f"Colour of item {i}?", "output": ["red", "blue"][i % 2], "task": "colour"} for i in range(6)]
    rows += [{"instruction": f"Repeat the phrase {w}", "output": f"the {w} sat on the mat", "task": "echo"}
             for w in ("cat", "dog", "bird")]
    return rows


def test_eval_reports_each_task(tmp_path, tiny_lora_adapter):
    from runtime.taskmetrics import metrics_by_task

    out = tmp_path / "ev"
    r, result = run_eval(tiny_lora_adapter, _two_task_rows(), out)
    answers = result["answers"]
    assert [a["task"] for a in answers] == ["colour"] * 6 + ["echo"] * 3
    expected = metrics_by_task([a["generated"] for a in answers], [a["reference"] for a in answers],
                               [a["task"] for a in answers], resamples=100)
    by_task = result["task_metrics_by_task"]
    assert list(by_task) == ["colour", "echo"] and by_task == json.loads(json.dumps(expected))
    assert by_task["colour"]["kind"] == "classification" and by_task["colour"]["rows"] == 6
    assert by_task["echo"]["kind"] == "generation" and "bleu" in by_task["echo"]
    md = (out / "eval.md").read_text()
    assert "## Task metrics per task" in md and "task `colour` (classification, 6 rows): accuracy " in md
    assert "task colour: 6 rows, classification" in r.output
