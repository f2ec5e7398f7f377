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


def test_eval_command_on_a_tiny_adapter(tmp_path, tiny_lora_adapter):
    from edgeft.cli import cli

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Colour of item {i}?", "output": ["red", "blue"][i % 2]}) + "\n"
                            for i in range(6)))
    out = tmp_path / "ev"
    r = CliRunner().invoke(cli, ["eval", "--model", str(tiny_lora_adapter), "--data", str(data), "--output", str(out),
                                 "--answer-tokens", "4", "--threads", "1", "--resamples", "100"])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "eval.json").read_text())
    m = result["task_metrics"]
    assert result["rows"] == 6 and m["kind"] == "classification" and result["perplexity"] > 1
    refs = [a["reference"] for a in result["answers"]]
    preds = [a["generated"] for a in result["answers"]]
    assert m["accuracy"] == classification_metrics(preds, refs)["accuracy"]
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Task metrics" in (out / "eval.md").read_text()
