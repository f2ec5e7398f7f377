"""Phone formats: a tiny llama written as an ONNX Runtime GenAI folder, an ORT-format model and an
ExecuTorch program (fp32, and 8da8w smoothed on calibration rows), each loaded by its own runtime and
meeting its bars; benchmarked by `edgeft bench` (GenAI and ORT workers without torch); damaged artifacts
refused with one line.

One export per format is shared across the module (GenAI and ORT take seconds, each ExecuTorch program
about 30 s).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft.core.records import RECORD_DIR_NAME, read_record

from conftest import make_tiny_llama

SIDE_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", RECORD_DIR_NAME}
PROJECT = Path(__file__).resolve().parents[1]


def _cli(args: list[str]):
    from edgeft.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mobile")


@pytest.fixture(scope="module")
def genai_dir(tiny_llama_dir, out_root) -> Path:
    pytest.importorskip("onnxruntime_genai")
    out = out_root / "genai"
    result = _cli(["export", "onnx", "--model", tiny_llama_dir, "--output", out, "--format", "genai"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def ort_dir(tiny_llama_dir, out_root) -> Path:
    from export.ort import export_ort

    out = out_root / "ort"
    assert export_ort(tiny_llama_dir, out).status == "passed"
    return out


@pytest.fixture(scope="module")
def pte_dir(tiny_llama_dir, out_root) -> Path:
    pytest.importorskip("executorch.exir")
    out = out_root / "executorch"
    result = _cli(["export", "executorch", "--model", tiny_llama_dir, "--output", out, "--quantize", "fp32",
                   "--max-seq-len", 128])
    assert result.exit_code == 0, result.output
    return out


# ---------------------------------------------------------------------------------------------
# Each format, loaded by its own runtime


def test_genai_folder_loads_generates_and_stops_at_end_of_turn(genai_dir, tiny_llama_dir):
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    assert {p.name for p in genai_dir.iterdir()} == SIDE_FILES | {"model.onnx", "genai_config.json"}
    record = read_record(genai_dir)
    assert record["status"] == "passed" and record["kind"] == "onnx-genai"
    names = {c["name"] for c in record["checks"]}
    assert {"genai_greedy_match", "genai_tokenizer_matches", "genai_chat_template_matches", "max_abs_diff"} <= names
    config = json.loads((genai_dir / "genai_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert tok.convert_tokens_to_ids("<|im_end|>") in config["model"]["eos_token_id"]

    model = og.Model(str(genai_dir))
    ids = tok("The capital of France is")["input_ids"]
    assert list(og.Tokenizer(model).encode("The capital of France is")) == ids
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 6, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    import torch
    from transformers import AutoModelForCausalLM

    torch_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    want = torch_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)[0].tolist()
    got = list(generator.get_sequence(0))
    assert got == want[: len(got)] and len(got) > len(ids)


def test_ort_format_model_loads_in_onnxruntime_with_operator_config(ort_dir, tiny_llama_dir):
    from export.onnx import OrtLM

    assert {p.name for p in ort_dir.iterdir()} == SIDE_FILES | {"model.ort", "model.required_operators.config"}
    assert (ort_dir / "model.ort").read_bytes()[4:8] == b"ORTM"
    ops = (ort_dir / "model.required_operators.config").read_text()
    assert "ai.onnx;" in ops and "# - model.ort" in ops  # no temporary path left in the header
    record = read_record(ort_dir)
    assert record["status"] == "passed" and record["kind"] == "ort"
    assert record["metrics"]["logits"]["max_abs_diff"] <= 1e-3
    assert set(record["files"]) == {"model.ort"}
    lm = OrtLM(ort_dir / "model.ort")  # plain onnxruntime.InferenceSession on the .ort file
    assert np.isfinite(lm.logits([[1, 2, 3, 4]], 0)[0]).all()


def test_executorch_program_runs_in_executorch_and_matches_pytorch(pte_dir, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from runtime.backends import ExecutorchBackend

    assert {p.name for p in pte_dir.iterdir()} == SIDE_FILES | {"model.pte", "edgeft-executorch.json"}
    record = read_record(pte_dir)
    assert record["status"] == "passed" and record["kind"] == "executorch", record["checks"]
    assert record["metrics"]["kv_cache"]["greedy_match"] is True
    backend = ExecutorchBackend(pte_dir, threads=1)
    ids = [1, 504, 3575, 282, 4649, 314]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(backend.logits(ids), want, atol=1e-3)
    backend.reset()  # the program's own cache: prefill, then one step
    backend.prefill(ids[:-1])
    np.testing.assert_allclose(backend.step(ids[-1]), want[-1], atol=1e-3)


@pytest.fixture(scope="module")
def calm_llama_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """The tiny llama at a smaller init, for the int8 activations of 8da8w and the smoothed int8 graph:
    the 0.2-std test model amplifies their rounding (XNNPACK 8da8w top-1 0.87 at mean KL 0.003; smoothed
    ONNX int8 after a LoRA step 0.90), this one measures 0.99 (8da8w)."""
    return make_tiny_llama(tmp_path_factory.mktemp("calm_llama"), smol_tokenizer_dir, init_std=0.05)


@pytest.fixture(scope="module")
def pte8_dir(calm_llama_dir, task_file, out_root) -> Path:
    pytest.importorskip("executorch.exir")
    out = out_root / "executorch-8da8w"
    result = _cli(["export", "executorch", "--model", calm_llama_dir, "--output", out, "--quantize", "8da8w",
                   "--max-seq-len", 128, "--calibration", task_file, "--smooth"])
    assert result.exit_code == 0, result.output
    return out


def test_executorch_8da8w_is_smoothed_quantized_and_passes_in_executorch(pte8_dir, calm_llama_dir, task_file):
    import torch
    from transformers import AutoModelForCausalLM

    from runtime.backends import ExecutorchBackend

    assert {p.name for p in pte8_dir.iterdir()} == SIDE_FILES | {"model.pte", "edgeft-executorch.json"}
    record = read_record(pte8_dir)
    assert record["status"] == "passed" and record["kind"] == "executorch", record["checks"]
    metrics = record["metrics"]
    assert metrics["variant"] == "8da8w" and metrics["bars"]["top1"] == 0.93 and metrics["bars"]["mean_kl"] == 0.02
    assert metrics["quantizer"]["scheme"] == "8da8w" and metrics["quantizer"]["weights"].startswith("int8 symmetric")
    smoothing = metrics["quantizer"]["smoothing"]  # forced: this calm model has no massive activations
    assert smoothing["outputs_identical"] and smoothing["channels_scaled"] > 0
    assert smoothing["file"] == str(task_file.resolve()) and smoothing["rows"] == 48
    assert json.loads((pte8_dir / "edgeft-executorch.json").read_text())["quantization"] == "8da8w"
    assert metrics["logits"]["max_abs_diff"] > 1e-3  # quantized: fp32 XNNPACK measures 5e-6

    backend = ExecutorchBackend(pte8_dir, threads=1)
    ids = [1, 504, 3575, 282, 4649, 314, 253, 1345]
    model = AutoModelForCausalLM.from_pretrained(calm_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = backend.logits(ids)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.875
    assert 0 < np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_executorch_smoothing_refusals_are_one_line(tiny_llama_dir, task_file, tmp_path):
    for args, message in ((["--quantize", "8da8w", "--smooth"], "--smooth needs --calibration"),
                          (["--quantize", "fp32", "--smooth", "--calibration", task_file], "only the quantized variants")):
        result = _cli(["export", "executorch", "--model", tiny_llama_dir, "--output", tmp_path / "o", *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_executorch_refuses_before_work(tiny_llama_dir, tmp_path):
    other = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    result = _cli(["export", "executorch", "--model", other, "--output", tmp_path / "out"])
    assert result.exit_code == 1 and "model_type 'gpt2' is not supported by the ExecuTorch export" in result.output
    assert not (tmp_path / "out").exists()
    result = _cli(["export", "executorch", "--model", tiny_llama_dir, "--output", tmp_path / "o", "--quantize", "int3"])
    assert result.exit_code == 2
    result = _cli(["export", "executorch", "--model", tiny_llama_dir, "--output", tmp_path / "o", "--max-seq-len", 20])
    assert result.exit_code == 2 and "--max-seq-len 20: the verification samples need" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# edgeft bench: each format through its own runtime worker


@pytest.fixture(scope="module")
def bench_report(tiny_llama_dir, genai_dir, ort_dir, pte_dir, task_file, out_root):
    out = out_root / "bench"
    result = _cli(["bench", "--reference", tiny_llama_dir, "--artifact", genai_dir, "--artifact", ort_dir,
                   "--artifact", pte_dir, "--data", task_file, "--output", out, "--threads", 1, "--max-rows", 3,
                   "--prompt-tokens", 16, "--new-tokens", 4, "--warmup", 0, "--repeats", 1, "--answer-tokens", 3])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def test_bench_reports_each_phone_format_with_size_and_memory(bench_report):
    entries = {e["kind"]: e for e in bench_report["entries"][1:]}
    assert set(entries) == {"onnx-genai", "ort", "executorch"}
    assert entries["onnx-genai"]["backend"] == "onnxruntime-genai" and entries["executorch"]["backend"] == "executorch"
    for e in entries.values():
        assert e["size_bytes"] > 0 and e["peak_rss_bytes"] > 0 and e["decode_tokens_per_s"] > 0
        assert e["top1_agreement"] >= 0.99 and e["precision"] == "fp32", e


@pytest.mark.parametrize("kind", ["onnx-genai", "ort"])
def test_genai_and_ort_workers_never_import_torch(kind, genai_dir, ort_dir):
    path = genai_dir if kind == "onnx-genai" else ort_dir
    code = ("import sys; sys.modules['torch'] = None\n"  # any torch import would now fail
            "from runtime.backends import import_engine, open_backend, greedy\n"
            f"import_engine({kind!r}); b = open_backend({kind!r}, {str(path)!r}, threads=1, max_tokens=64)\n"
            "assert len(greedy(b, [1, 2, 3], 4)) == 4 and b.logits([1, 2, 3]).shape[0] == 3\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Damaged artifacts: refused with one line


def _damaged(src: Path, dest: Path, name: str, keep: float) -> Path:
    shutil.copytree(src, dest)
    data = (dest / name).read_bytes()
    (dest / name).write_bytes(data[: int(len(data) * keep)])
    return dest


def test_damaged_phone_artifacts_refused_with_one_line(genai_dir, ort_dir, pte_dir, tiny_llama_dir, task_file, tmp_path):
    bad_ort = _damaged(ort_dir, tmp_path / "ort", "model.ort", 0.5)
    bad_pte = _damaged(pte_dir, tmp_path / "pte", "model.pte", 0.5)
    bad_genai = _damaged(genai_dir, tmp_path / "genai", "genai_config.json", 0.5)
    for bad, names in ((bad_ort, "model.ort"), (bad_pte, "model.pte"), (bad_genai, "genai_config.json")):
        result = _cli(["bench", "--reference", tiny_llama_dir, "--artifact", bad, "--data", task_file,
                       "--output", tmp_path / "out"])
        assert result.exit_code == 1 and names in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    # Without the record's protection, the file checks still refuse the program and the GenAI folder.
    for bad, words in ((bad_pte, "truncated ExecuTorch program"), (bad_genai, "not a valid ONNX Runtime GenAI config")):
        result = _cli(["bench", "--reference", tiny_llama_dir, "--artifact", bad, "--data", task_file,
                       "--output", tmp_path / "out", "--allow-unverified"])
        assert result.exit_code == 1 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


# ---------------------------------------------------------------------------------------------
# edgeft run: the phone formats as pipeline stages, benchmarked beside the others


def test_pipeline_exports_phone_formats_and_benches_them(calm_llama_dir, task_file, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("executorch.exir")
    out = tmp_path / "run"
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"""output: {out}
train: {{model: '{calm_llama_dir}', data: '{task_file}', method: lora, max_steps: 1, batch_size: 4,
        max_seq_len: 64, eval_every: 0, save_every: 0, threads: 1}}
export: {{onnx: [], gguf: [], genai: [int8], executorch: [fp32]}}
bench: {{max_rows: 3, threads: 1, repeats: 1, warmup: 0, prompt_tokens: 16, new_tokens: 4, answer_tokens: 3}}
""")
    result = _cli(["run", "--config", config])
    assert result.exit_code == 0, result.output
    genai, pte = read_record(out / "genai-int8"), read_record(out / "executorch-fp32")
    assert genai["status"] == "passed" and genai["kind"] == "onnx-genai" and genai["metrics"]["variant"] == "int8"
    # ONNX int8 smoothing is opt-in (--smooth): the pipeline's calibration rows leave it unsmoothed
    assert "smoothing" not in genai["metrics"]["quantizer"]
    assert pte["status"] == "passed" and pte["kind"] == "executorch" and pte["metrics"]["variant"] == "fp32"
    report = json.loads((out / "bench" / "report.json").read_text())
    entries = {Path(e["path"]).name: e for e in report["entries"]}
    assert entries["genai-int8"]["backend"] == "onnxruntime-genai" and entries["genai-int8"]["precision"] == "int8"
    assert entries["executorch-fp32"]["backend"] == "executorch" and entries["executorch-fp32"]["size_bytes"] > 0
    assert all("error" not in e for e in entries.values()), entries
    rerun = _cli(["run", "--config", config])  # every stage complete: all skipped
    assert rerun.exit_code == 0 and rerun.output.count("already complete, skipped") == 5, rerun.output
