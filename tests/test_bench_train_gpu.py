"""benchmarks/bench_train.py's GPU mode: the whole path (model build, both recipes, JSON, PNG) on the
tiny Llama shape, on CUDA where there is a GPU and on the CPU everywhere; the 7B shape's size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_train.py"


def run_bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def read_result(out: Path) -> dict:
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.read_text())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mode_tiny_on_cuda(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    p = run_bench("--device", "cuda", "--shape", "tiny", "--steps", "3", "--warmup", "1", "--repeats", "1",
                  "--seq-len", "128", "--rows", "64", "--out", str(out), "--sst2", str(sst2_rows(tmp_path / "t.tsv", 64)))
    assert p.returncode == 0, p.stderr[-3000:]
    table = read_result(out)
    assert table["machine"]["gpu"] == torch.cuda.get_device_name(0)
    for side in ("edgeft", "baseline"):
        assert table[side]["peak_allocated_mb"] > 0
        assert table[side]["peak_reserved_mb"] >= table[side]["peak_allocated_mb"]
        assert table[side]["tokens_per_s"] > 0
    assert "edgeft peak allocated" in p.stdout


def sst2_rows(path: Path, rows: int) -> Path:
    """A small SST-2-format TSV (label, tab, review), so the test needs no data set beside the project."""
    words = ["a stirring , funny film", "one long string of cliches", "warm and moving", "dull and far too long"]
    path.write_text("".join(f"{i % 2}\t{words[i % 4]} , take {i} .\n" for i in range(rows)))
    return path


@pytest.mark.slow
def test_gpu_mode_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    p = run_bench("--shape", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "1", "--repeats", "1",
                  "--seq-len", "64", "--rows", "32", "--threads", "1", "--out", str(out),
                  "--sst2", str(sst2_rows(tmp_path / "train.tsv", 32)))
    assert p.returncode == 0, p.stderr[-3000:]
    table = read_result(out)
    assert table["setup"]["model_build"]["config"]["hidden_size"] == 64
    assert table["setup"]["model_build"]["vocabulary"].endswith(" tokens")
    # Both sides train on the same packed sequences. edgeft counts the tokens of its timed steps, the baseline
    # the mean pack (the Trainer shuffles): close, not equal, on a 32-row set (242 against 242.75 measured).
    per_step = table["setup"]["tokens_per_step"]
    assert per_step["edgeft"] == pytest.approx(per_step["baseline"], rel=0.1)
    for side in ("edgeft", "baseline"):
        assert table[side]["tokens_per_s"] > 0 and table[side]["peak_rss_mb"] > 0
        assert table[side]["final_loss"] > 0
    assert table["speedup"] == pytest.approx(table["edgeft"]["tokens_per_s"] / table["baseline"]["tokens_per_s"])
    assert "| ratio (edgeft / baseline) |" in p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_cuda_without_gpu_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    p = run_bench("--device", "cuda", "--shape", "tiny", "--out", str(out), timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().startswith("no CUDA device:") and len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_llama2_7b_shape_has_llama2_size(smol_tokenizer_dir: Path) -> None:
    """Built on the meta device (no memory): Llama-2-7B's 6,738,415,616 parameters with its 32,000-token
    vocabulary, plus input and output embeddings for the embedded tokenizer's extra tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_shapes import shape_config

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config("llama2-7b", tok), dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert n == 6_738_415_616 + 2 * (len(tok) - 32_000) * 4096
    assert model.config.rope_theta == 10000.0 and model.config.rms_norm_eps == 1e-5
