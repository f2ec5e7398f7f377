"""`edgeft train --split-by task`: one adapter per task value of one data file, each an ordinary run."""

from __future__ import annotations

import json

from click.testing import CliRunner

from edgeft.cli import cli

TASKS = {"sentiment": ["positive", "negative"], "topic": ["sport", "music", "food"]}


def _rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        task = "sentiment" if i % 3 else "topic"
        labels = TASKS[task]
        out.append({"task": task, "instruction": f"Label text {i}.", "output": labels[i % len(labels)]})
    return out


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train(*args: str):
    return CliRunner().invoke(cli, ["train", "--method", "lora", "--max-steps", "2", "--batch-size", "4",
                                    "--max-seq-len", "48", "--lora-r", "4", "--optimizer", "adamw",
                                    "--eval-every", "0", "--save-every", "0", *args])


def test_one_adapter_per_task(tmp_path, tiny_llama_dir):
    data = _write(tmp_path / "train.jsonl", _rows(24))
    evals = _write(tmp_path / "eval.jsonl", _rows(6))
    out = tmp_path / "out"
    r = _train("--model", str(tiny_llama_dir), "--data", data, "--eval-data", evals, "--output", str(out),
               "--split-by", "task")
    assert r.exit_code == 0, r.output
    assert "2 task(s): topic (8 rows, 2 eval), sentiment (16 rows, 4 eval)" in r.output
    for task, n_rows, n_eval in (("sentiment", 16, 4), ("topic", 8, 2)):
        run = json.loads((out / task / "edgeft-run.json").read_text())
        assert run["status"] == "completed" and run["steps"] == 2
        assert (run["data"]["rows"], run["data"]["eval_rows"]) == (n_rows, n_eval)
        assert (out / task / "adapter_model.safetensors").is_file()
        split_rows = [json.loads(x) for x in open(run["config"]["data"])]
        assert {x["task"] for x in split_rows} == {task} and len(split_rows) == n_rows
    summary = json.loads((out / "edgeft-split.json").read_text())
    assert summary["tasks"]["topic"] == {"rows": 8, "eval_rows": 2, "output": str(out / "topic")}
    # a second run with --resume finds both tasks done and trains nothing
    r = _train("--model", str(tiny_llama_dir), "--data", data, "--eval-data", evals, "--output", str(out),
               "--split-by", "task", "--resume")
    assert r.exit_code == 0 and r.output.count("already trained") == 2, r.output


def _error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_bad_task_values_are_one_line_errors(tmp_path, tiny_llama_dir):
    out = str(tmp_path / "out")
    rows = _rows(6)
    del rows[3]["task"]
    r = _train("--data", _write(tmp_path / "a.jsonl", rows), "--output", out, "--split-by", "task")
    assert r.exit_code == 1 and f"{tmp_path / 'a.jsonl'}:4: missing field 'task'" in _error_line(r)
    rows = _rows(6)
    rows[2]["task"] = "../escape"
    r = _train("--data", _write(tmp_path / "b.jsonl", rows), "--output", out, "--split-by", "task")
    assert r.exit_code == 1
    assert "b.jsonl:3: field 'task' value '../escape' is not a safe directory name" in _error_line(r)
    evals = _write(tmp_path / "e.jsonl", [r for r in _rows(6) if r["task"] == "topic"])
    r = _train("--data", _write(tmp_path / "c.jsonl", _rows(6)), "--eval-data", evals, "--output", out,
               "--split-by", "task")
    assert r.exit_code == 1 and "no rows for task(s) sentiment" in _error_line(r)
    assert not (tmp_path / "out" / "sentiment").exists()
    r = _train("--data", evals, "--output", out, "--split-by", "task", "--task-weights", "topic=2")
    assert r.exit_code == 2 and "--task-weights mixes tasks in one adapter" in _error_line(r)
