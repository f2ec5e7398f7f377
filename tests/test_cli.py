"""Exact CLI behaviour: one-line errors, exit codes, config precedence; no weights loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.config import TrainConfig, load_yaml, validate

CONFIG_DIR = Path(__file__).parent.parent / "edgeft" / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.name != "pipeline.yaml")


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n')
    return p


def error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output  # exactly one line, no traceback
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    "args, expected, code",
    [
        (["--data", "nope.jsonl", "--output", "o"], "edgeft: error: --data nope.jsonl: file not found", 2),
        (["--data", "{good}", "--output", "o", "--method", "magic"], "Invalid value for '--method'", 2),
        (["--data", "{good}", "--output", "o", "--lr", "fast"], "Invalid value for '--lr'", 2),
        (["--data", "{good}", "--output", "o", "--model", "/no/such/model"], "--model /no/such/model: model path does not exist", 1),
        (["--data", "{good}", "--output", "o", "--batch-size", "0"], "--batch-size must be >= 1", 2),
        (["--output", "o"], "--data is required", 2),
    ],
)
def test_train_errors_are_one_line(tmp_path, good, monkeypatch, args, expected, code):
    monkeypatch.chdir(tmp_path)
    r = invoke("train", *[a.replace("{good}", str(good)) for a in args])
    assert r.exit_code == code
    assert expected in error_line(r)


def test_bad_row_error_names_file_line_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "rows.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "  "}\n')
    r = invoke("train", "--data", str(p), "--output", "o")
    assert r.exit_code == 1
    assert error_line(r) == f"edgeft: error: {p}:2: field 'output' is empty"


def test_non_empty_output_needs_overwrite(tmp_path, good):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = invoke("train", "--data", str(good), "--output", str(out), "--model", str(tmp_path / "missing"))
    assert r.exit_code != 0
    assert (out / "keep.txt").read_text() == "precious"


def test_yaml_unknown_key_and_wrong_type_named(tmp_path, good):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_rank: 8\nbatch_size: four\n")
    r = invoke("train", "--config", str(cfg), "--data", str(good), "--output", "o")
    line = error_line(r)
    assert r.exit_code == 2
    assert "unknown key 'lora_rank'" in line and "'batch_size' must be int, got str 'four'" in line


def test_flag_beats_yaml_beats_default(tmp_path, good, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1.0e-3\nbatch_size: 3\n")
    seen = {}

    def fake_train(c, **kw):  # stop before any model work: only the merged config matters here
        seen["cfg"] = c
        raise SystemExit(0)

    monkeypatch.setattr("edgeft.train.train", fake_train)
    invoke("train", "--config", str(cfg), "--data", str(good), "--output", "o", "--batch-size", "5")
    c = seen["cfg"]
    assert (c.batch_size, c.lr, c.lora_r) == (5, 1e-3, TrainConfig().lora_r)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_yaml_examples_load_and_validate(path, good, tmp_path):
    values = load_yaml(path)
    assert values, path
    validate(TrainConfig(**values, data=str(good), output=str(tmp_path / "o")))


def test_help_is_fast_and_lists_commands():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("train", "merge", "export", "import-gguf"):
        assert cmd in r.output


def test_import_gguf_rejects_non_gguf(tmp_path):
    p = tmp_path / "fake.gguf"
    p.write_bytes(b"NOPE" + b"\0" * 64)
    r = invoke("import-gguf", str(p))
    assert r.exit_code == 1
    assert error_line(r) == f"edgeft: error: {p}: not a GGUF file (bad magic)"


def test_shipped_pipeline_example_loads(tmp_path, good):
    from edgeft.pipeline import load_pipeline

    text = (CONFIG_DIR / "pipeline.yaml").read_text()
    text = text.replace("train.jsonl", str(good)).replace("eval.jsonl", str(good)).replace("runs/", f"{tmp_path}/")
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    cfg = load_pipeline(p)
    assert cfg.onnx == ["fp32", "int8"] and cfg.gguf == ["f16", "q8_0", "q4_k_m"]
    p.write_text(text.replace("onnx: [fp32, int8]", "onnx: [auto]"))
    assert load_pipeline(p).onnx == ["auto"]  # the accuracy-budget search, for the ONNX export only
    assert cfg.train.output == str(tmp_path / "pipeline" / "adapter") and cfg.bench_extra["new_tokens"] == 128


def test_pipeline_phone_formats_are_checked_and_the_example_loads(tmp_path, good, monkeypatch):
    import importlib.util

    from edgeft import pipeline
    from edgeft.pipeline import EXECUTORCH_VARIANTS, load_pipeline

    p = tmp_path / "p.yaml"
    for key, bad in (("genai", "int3"), ("ort", "8da8w"), ("executorch", "int8"), ("genai", "auto")):
        p.write_text(f"output: {tmp_path}/o\ntrain: {{data: {good}}}\nexport: {{{key}: [{bad}]}}\n")
        r = invoke("run", "--config", str(p))
        assert r.exit_code == 2 and f"export.{key}: unknown variant(s) {bad}" in error_line(r)
        assert not (tmp_path / "o").exists()
    # a format whose runtime is not installed is refused before any stage runs
    monkeypatch.setitem(pipeline.MOBILE_EXPORTS, "genai", (pipeline.ONNX_VARIANTS, "export.genai", "export_genai",
                                                           ("no_such_runtime_module",)))
    p.write_text(f"output: {tmp_path}/o\ntrain: {{data: {good}}}\nexport: {{genai: [int8]}}\n")
    r = invoke("run", "--config", str(p))
    assert r.exit_code == 2 and "export.genai needs the mobile extra (no_such_runtime_module" in error_line(r)
    assert not (tmp_path / "o").exists()
    monkeypatch.undo()
    if not all(importlib.util.find_spec(m) for m in ("onnxruntime_genai", "executorch", "torchao")):
        pytest.skip("the mobile extra is not installed")
    from export.executorch import QUANTIZATIONS

    assert set(EXECUTORCH_VARIANTS) == set(QUANTIZATIONS)
    text = (CONFIG_DIR / "pipeline.yaml").read_text().replace("train.jsonl", str(good)).replace("eval.jsonl", str(good))
    p.write_text(text.replace("runs/", f"{tmp_path}/").replace("  # genai:", "  genai:").replace("  # ort:", "  ort:")
                 .replace("  # executorch:", "  executorch:"))
    cfg = load_pipeline(p)
    assert (cfg.genai, cfg.ort, cfg.executorch) == (["int8"], ["int8"], ["8da8w"])
    assert cfg.onnx == ["fp32", "int8"] and cfg.gguf == ["f16", "q8_0", "q4_k_m"]  # unchanged by the new keys


def test_pipeline_yaml_errors_name_the_key(tmp_path, good):
    p = tmp_path / "p.yaml"
    p.write_text(f"output: {tmp_path}/o\ntrain: {{data: {good}, lr: fast}}\nexport: {{gguf: [q3_k]}}\n")
    r = invoke("run", "--config", str(p))
    assert r.exit_code == 2 and "'lr' must be float, got str 'fast'" in error_line(r)
    p.write_text(f"output: {tmp_path}/o\ntrain: {{data: {good}}}\nexport: {{gguf: [q3_k]}}\n")
    r = invoke("run", "--config", str(p))
    assert r.exit_code == 2 and "export.gguf: unknown variant(s) q3_k" in error_line(r)
    p.write_text(f"output: {tmp_path}/o\ntrain: {{data: {good}}}\nbenchh: {{}}\n")
    r = invoke("run", "--config", str(p))
    assert r.exit_code == 2 and "unknown key(s) 'benchh'" in error_line(r)
