"""runtime: the four back-ends agree with the unmerged reference, the report holds the figures, errors are one line.

One QLoRA adapter (real bitsandbytes 4-bit base + LoRA with random B, so the adapter matters)
is built on the tiny llama, merged (nf4-dequant), exported to ONNX fp32 and GGUF f16, and
benchmarked once through the CLI with a small workload. That run also uses ``--strict`` with
an impossible top-1 bar, so it checks the exit status 4 and that the report is still written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_adapter
from runtime.latency import RunTiming, summarise
from runtime.thresholds import TOP1_MIN, flags_for, parse_top1_overrides, top1_bar

ENTRY_FIELDS = {"name", "role", "path", "kind", "backend", "precision", "size_bytes", "weight_bytes",
                "weight_bytes_per_token", "load_s", "ttft_s", "prompt_tokens_per_s", "decode_tokens_per_s",
                "decode_tokens_per_s_min", "decode_tokens_per_s_max", "token_latency_p50_s", "token_latency_p95_s",
                "peak_rss_bytes", "bandwidth_limit_tokens_per_s", "bandwidth_fraction", "task_accuracy", "perplexity",
                "top1_agreement", "mean_kl", "generation_agreement", "decode_speedup_vs_reference", "verification",
                "flags", "flagged", "top1_bar", "threads"}
EVAL_ROWS = 8


def bench(*args: object):
    """Run `edgeft bench` through the group class the real CLI uses (one-line errors, exit codes)."""
    from click.testing import CliRunner

    from edgeft.cli import EdgeftGroup
    from runtime.cli_bench import bench_cmd

    group = EdgeftGroup(commands=[bench_cmd])
    return CliRunner().invoke(group, ["bench", *map(str, args)])


def one_line_error(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("edgeft: error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Artifacts


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama_dir) -> Path:
    """A QLoRA adapter as `edgeft train` leaves it: PEFT files, tokenizer, edgeft-run.json."""
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("bench") / "adapter", qlora=True, seed=3)


@pytest.fixture(scope="module")
def artifacts(adapter) -> dict[str, Path]:
    """Merged (fp32, nf4-dequant), ONNX fp32 and GGUF f16, each with a passed verification record."""
    from edgeft.merge import merge_adapter

    root = adapter.parent
    merged = root / "merged"
    assert merge_adapter(adapter, merged).status == "passed"
    export_onnx = pytest.importorskip("export.onnx").export_onnx
    export_gguf = pytest.importorskip("export.gguf").export_gguf
    assert export_onnx(merged, root / "onnx").status == "passed"
    gguf = root / "gguf" / "tiny-f16.gguf"
    assert export_gguf(merged, gguf, qtype="f16").status == "passed"
    return {"merged": merged, "onnx": root / "onnx", "gguf": gguf}


@pytest.fixture(scope="module")
def eval_file(adapter) -> Path:
    from edgeft.tasks import make_rows

    path = adapter.parent / "eval.jsonl"
    rows = [r | {"task": "set1" if i < EVAL_ROWS // 2 else "set2"} for i, r in enumerate(make_rows(EVAL_ROWS, seed=7))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # two tasks: bench also scores each on its own
    return path


@pytest.fixture(scope="module")
def bench_run(adapter, artifacts, eval_file):
    # One thread: llama.cpp's thread barrier spins, and on a shared 2-core machine a second
    # thread waiting for a descheduled one makes the run ten times slower (numbers, not speed, are tested).
    out = adapter.parent / "report"
    result = bench("--reference", adapter, "--artifact", artifacts["merged"], "--artifact", artifacts["onnx"],
                   "--artifact", artifacts["gguf"], "--data", eval_file, "--output", out, "--threads", 1,
                   "--prompt-tokens", 16, "--new-tokens", 8, "--warmup", 1, "--repeats", 2, "--answer-tokens", 4,
                   "--strict", "--min-top1", 1.01)
    return result, out


# ---------------------------------------------------------------------------------------------
# The benchmark run


def test_backends_agree_with_the_unmerged_reference(bench_run, adapter, artifacts):
    result, out = bench_run
    report = json.loads((out / "report.json").read_text())
    entries = {e["name"]: e for e in report["entries"]}
    assert list(entries) == ["adapter", "merged", "onnx", "tiny-f16.gguf"]
    ref = entries["adapter"]
    assert (ref["role"], ref["kind"], ref["backend"], ref["precision"]) == ("reference", "unmerged", "pytorch", "nf4+lora")
    assert ref["top1_agreement"] == 1.0 and ref["mean_kl"] == 0.0
    for name, kind, precision in (("merged", "merged", "fp32"), ("onnx", "onnx", "fp32"), ("tiny-f16.gguf", "gguf", "f16")):
        e = entries[name]
        assert (e["kind"], e["precision"], e["verification"]) == (kind, precision, "passed")
        assert e["compared_positions"] == ref["compared_positions"] > EVAL_ROWS * 5
    # Merged (nf4-dequant) and ONNX fp32 reproduce the 4-bit model as trained up to float rounding.
    assert entries["merged"]["top1_agreement"] >= 0.99 and entries["onnx"]["top1_agreement"] >= 0.99
    assert entries["merged"]["mean_kl"] < 1e-6 and entries["onnx"]["mean_kl"] < 1e-6
    # llama.cpp f16: distributions agree to KL ~1e-5, but this random tiny model has many
    # near-tied top-2 logits, which f16 activations flip (measured 0.966-0.993 top-1 here; the real
    # model gives 0.998). KL is the bar that separates a faithful export from a broken one.
    assert entries["tiny-f16.gguf"]["mean_kl"] < 1e-4
    assert entries["tiny-f16.gguf"]["top1_agreement"] >= 0.95
    assert entries["tiny-f16.gguf"]["generation_agreement"] == 1.0
    assert entries["merged"]["generation_agreement"] == 1.0 and entries["onnx"]["generation_agreement"] == 1.0
    # Teacher-forced perplexity of the answers is the reference's wherever the logits are.
    assert entries["merged"]["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)
    assert entries["onnx"]["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)


def test_report_fields_files_and_strict_exit(bench_run, artifacts):
    from runtime.weights import safetensors_bytes

    result, out = bench_run
    # --strict with an impossible bar: exit 4, one line naming every artifact; the report is still written.
    assert result.exit_code == 4, result.output
    line = one_line_error(result)
    assert "--strict" in line and "merged" in line and "onnx" in line and "tiny-f16.gguf" in line
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_vs_size.png", "latency.png", "report.json", "report.md"]
    for png in ("latency.png", "accuracy_vs_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((out / "report.json").read_text())
    assert report["flagged"] == ["merged", "onnx", "tiny-f16.gguf"]
    for e in report["entries"]:
        assert ENTRY_FIELDS <= set(e), ENTRY_FIELDS - set(e)
        assert e["size_bytes"] > 0 and e["weight_bytes"] > 0 and e["peak_rss_bytes"] > 2**20
        assert e["decode_tokens_per_s"] > 0 and e["ttft_s"] > 0 and e["prompt_tokens_per_s"] > 0
        assert e["token_latency_p50_s"] <= e["token_latency_p95_s"]
        assert e["decode_tokens_per_s_min"] <= e["decode_tokens_per_s"] <= e["decode_tokens_per_s_max"]
        assert 0 < e["bandwidth_fraction"] and 0 <= e["task_accuracy"] <= 1 and e["threads"] == 1
        assert len(e["latency_runs"]) == 2
        if e["role"] == "artifact":
            assert e["flags"] == [f"top-1 {e['top1_agreement']:.4f} < 1.01"]
    entries = {e["name"]: e for e in report["entries"]}
    # ONNX and llama.cpp workers never import torch.
    assert entries["onnx"]["torch_imported"] is False and entries["tiny-f16.gguf"]["torch_imported"] is False
    # Weight bytes: the torch parameters of the merged fp32 model are its safetensors; tied embeddings are read whole.
    merged_bytes = safetensors_bytes(artifacts["merged"])
    assert entries["merged"]["weight_bytes"] == entries["merged"]["weight_bytes_per_token"] == merged_bytes
    assert entries["onnx"]["weight_bytes"] == pytest.approx(merged_bytes, rel=0.01)
    assert entries["tiny-f16.gguf"]["weight_bytes"] == pytest.approx(merged_bytes / 2, rel=0.01)
    assert report["machine"]["bandwidth"]["read_gbps"] > 0 and report["machine"]["cpu_model"]
    assert report["workload"]["latency"] == {**report["workload"]["latency"], "batch": 1, "prompt_tokens": 16,
                                             "new_tokens": 8, "repeats": 2, "eos_ignored": True}
    assert {"torch", "onnxruntime", "llama-cpp-python"} <= set(report["versions"])
    md = (out / "report.md").read_text()
    assert md.count("\n| ") == 1 + 4 and "FLAGGED" in md  # header + one row per model


def test_report_scores_each_task(bench_run):
    from runtime.taskmetrics import task_metrics

    _, out = bench_run
    report = json.loads((out / "report.json").read_text())
    for e in report["entries"]:
        answers, by_task = e["answers"], e["task_metrics_by_task"]
        assert list(by_task) == ["set1", "set2"] and [a["task"] for a in answers] == ["set1"] * 4 + ["set2"] * 4
        for task, metrics in by_task.items():
            rows = [a for a in answers if a["task"] == task]
            assert metrics["rows"] == 4
            expected = task_metrics([a["generated"] for a in rows], [a["reference"] for a in rows])
            assert metrics == json.loads(json.dumps(expected)), (e["name"], task)
    md = (out / "report.md").read_text()
    assert "## Task metrics per task" in md and md.count("task `set1` (") == len(report["entries"])


# ---------------------------------------------------------------------------------------------
# Errors before any model runs: one line each


def test_missing_and_unknown_artifacts(adapter, eval_file, tmp_path):
    odd = tmp_path / "notes"
    odd.mkdir()
    (odd / "readme.txt").write_text("not a model")
    result = bench("--reference", adapter, "--artifact", tmp_path / "nope.gguf", "--artifact", odd,
                   "--data", eval_file, "--output", tmp_path / "out")
    assert result.exit_code == 1
    line = one_line_error(result)
    assert f"--artifact {tmp_path / 'nope.gguf'}: not found" in line
    assert f"--artifact {odd}: unknown artifact kind" in line
    assert not (tmp_path / "out").exists()


def test_unverified_and_failed_artifacts(adapter, artifacts, eval_file, tiny_llama_dir, tmp_path):
    from edgeft.core.records import Check, Record, write_record

    failed = tmp_path / "failed.gguf"
    os.symlink(artifacts["gguf"], failed)
    write_record(failed, Record(str(failed), "gguf", "test", checks=[Check("top1_agreement", 0.5, 0.99)]))
    result = bench("--reference", adapter, "--artifact", tiny_llama_dir, "--artifact", failed,
                   "--data", eval_file, "--output", tmp_path / "out")
    assert result.exit_code == 1
    line = one_line_error(result)
    assert f"--artifact {tiny_llama_dir}: no verification record" in line and "--allow-unverified" in line
    assert f"--artifact {failed}: failed its verification (top1_agreement)" in line


def test_tokenizer_mismatch_names_both(adapter, artifacts, eval_file, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(artifacts["merged"], other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["Ġquick"], vocab["Ġbrown"] = vocab["Ġbrown"], vocab["Ġquick"]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    result = bench("--reference", adapter, "--artifact", other, "--data", eval_file, "--output", tmp_path / "out")
    assert result.exit_code == 1
    line = one_line_error(result)
    assert f"tokenizer of --artifact {other}" in line and f"--reference {adapter}" in line


def test_bad_eval_row_names_file_and_line(adapter, artifacts, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "hi"}\n{"instruction": "Say hi."}\n')
    result = bench("--reference", adapter, "--artifact", artifacts["gguf"], "--data", data, "--output", tmp_path / "out")
    assert result.exit_code == 1
    assert f"{data}:2: missing field 'output'" in one_line_error(result)


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_runtime_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import runtime.backends, runtime.bench, runtime.worker, runtime.cli_bench"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr


def test_latency_summary_median_spread_and_percentiles():
    runs = [RunTiming(64, 0.2, 0.2, [0.01] * 9 + [0.03]), RunTiming(64, 0.1, 0.1, [0.01] * 10),
            RunTiming(64, 0.4, 0.4, [0.02] * 10)]
    s = summarise(runs)
    assert s["ttft_s"] == pytest.approx(0.2) and s["ttft_s_min"] == 0.1 and s["ttft_s_max"] == 0.4
    assert s["ttft_s_spread"] == pytest.approx(1.5)
    assert s["prompt_tokens_per_s"] == pytest.approx(320)
    assert s["decode_tokens_per_s"] == pytest.approx(10 / 0.12)  # medians of 83.3, 100, 50
    assert s["token_latency_p50_s"] == pytest.approx(0.01) and s["token_latency_p95_s"] == pytest.approx(0.02)


def test_thresholds_by_precision_and_accuracy_drop():
    assert top1_bar("gguf", "f16") == top1_bar("onnx", "fp32") == top1_bar("merged", "fp32") == TOP1_MIN["lossless"]
    assert top1_bar("gguf", "q8_0") == top1_bar("onnx", "int8") == 0.98
    assert top1_bar("gguf", "q4_k_m") == top1_bar("onnx", "int4") == 0.95
    assert top1_bar("executorch", "8da8w") == 0.98 and top1_bar("executorch", "8da4w") == 0.95
    entry = {"kind": "gguf", "precision": "q4_k_m", "top1_agreement": 0.96, "task_accuracy": 0.80}
    assert flags_for(entry, reference_accuracy=0.805) == []
    assert flags_for(entry, reference_accuracy=0.82) == ["task accuracy 0.8000 < reference 0.820 - 0.01"]
    assert flags_for({**entry, "top1_agreement": float("nan")}, None) == ["top-1 nan < 0.95"]
    assert flags_for({**entry, "precision": "q8_0"}, 0.8) == ["top-1 0.9600 < 0.98"]
    overrides = parse_top1_overrides(["0.97", "4-bit=0.9"])
    assert overrides == {"all": 0.97, "4-bit": 0.9}
    assert top1_bar("gguf", "q4_k_m", overrides) == 0.9 and top1_bar("onnx", "fp32", overrides) == 0.97
    with pytest.raises(Exception, match="unknown class '3-bit'"):
        parse_top1_overrides(["3-bit=0.5"])


def test_eval_rows_skip_the_shared_system_prompt(smol_tokenizer_dir, tmp_path):
    from runtime.modelfiles import load_tokenizer
    from runtime.bench import eval_set

    tok = load_tokenizer(str(smol_tokenizer_dir))
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Name a colour."},
                                             {"role": "assistant", "content": "Blue."}]}) + "\n")
    (row,) = eval_set(tok, data, None, 4).rows
    assert "SmolLM" in tok.decode(row.ids[: row.compare_from])  # the default system prompt is skipped
    assert tok.decode(row.ids[row.compare_from: row.prompt_len]).startswith("Name a colour.")
    assert tok.decode(row.ids[row.prompt_len:]) == "Blue.<|im_end|>"


def test_eval_rows_score_each_shared_context_once(smol_tokenizer_dir, tmp_path):
    """Rows that share an instruction have the same logits over it: one row scores those positions."""
    from runtime.modelfiles import load_tokenizer
    from runtime.bench import eval_set

    tok = load_tokenizer(str(smol_tokenizer_dir))
    data = tmp_path / "eval.jsonl"
    reviews = ["a dull , lifeless film .", "warm and funny .", "a dull , lifeless film .", "loud ."]
    data.write_text("".join(json.dumps({"instruction": "Classify the sentiment of this review.", "input": r,
                                        "output": "negative"}) + "\n" for r in reviews))
    evals = eval_set(tok, data, None, 4)
    prompt_only = [tuple(r.ids[:t + 1]) for r in evals.rows for t in range(r.compare_from, r.prompt_len - 1)]
    assert len(prompt_only) == len(set(prompt_only))  # no context of the prompts is scored twice
    for r in evals.rows:  # every answer position is still scored
        assert r.compare_from <= r.prompt_len - 1
    first, repeat = sorted((evals.rows[0], evals.rows[2]), key=lambda r: r.ids)
    assert repeat.compare_from == repeat.prompt_len - 1  # an identical row scores its answer positions only
    assert first.compare_from < first.prompt_len - 1
    instruction = tok.decode(evals.rows[0].ids[: evals.rows[0].prompt_len])
    assert "Classify the sentiment" in instruction
    scoring_instruction = [r for r in evals.rows if "Classify" in tok.decode(r.ids[r.compare_from: r.prompt_len])]
    assert len(scoring_instruction) == 1
    alone = eval_set(tok, _one_row(tmp_path, data), None, 4).rows[0]
    assert alone.compare_from < min(r.compare_from for r in evals.rows if r is not scoring_instruction[0])


def _one_row(tmp_path, data):
    path = tmp_path / "one.jsonl"
    path.write_text(data.read_text().splitlines()[1] + "\n")
    return path


def test_bandwidth_is_measured():
    from runtime.machine import measure_bandwidth

    bw = measure_bandwidth(2, buffer_bytes=16 * 2**20, repeats=2)
    assert bw["read_gbps"] > 0.1 and set(bw["read_gbps_by_threads"]) == {"1", "2"}
    assert np.isfinite(bw["copy_gbps"])

