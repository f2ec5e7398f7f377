"""Data-parallel training on CPU: two gloo processes on a tiny model, launched the ways users launch them
(``edgeft train --num-processes 2`` and ``torchrun -m edgeft``), against one process."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.train.checkpoint import resume_batch_problem
from edgeft.train.distributed import World, shard
from edgeft.train.launch import relay_rank_lines

torch_distributed = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not torch_distributed.is_available(), reason="torch built without distributed")

# fp32 compute and plain AdamW: the two runs differ only in the order of floating-point sums.
COMMON = ["--method", "lora", "--max-seq-len", "64", "--lr", "5e-3", "--lora-r", "8", "--eval-split", "0.1",
          "--warmup-steps", "0", "--seed", "7", "--optimizer", "adamw", "--compute-dtype", "float32",
          "--lr-scheduler", "constant", "--dist-timeout", "60"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def edgeft_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeft", "train", *args]


def torchrun_cmd(processes: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "edgeft", "train", *args]


def train_here(*args: str):
    result = CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def losses(out: Path, key: str) -> list[float]:
    return [m[key] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in m]


def test_two_processes_at_batch_b_equal_one_process_at_batch_2b(tmp_path, tiny_llama_dir, task_file):
    """Same rows per optimizer step, same order: the same adapter, losses and eval losses."""
    from safetensors.torch import load_file

    data = ["--model", str(tiny_llama_dir), "--data", str(task_file), *COMMON, "--max-steps", "4",
            "--grad-accum", "2", "--eval-every", "2", "--save-every", "0"]
    two, one = tmp_path / "two", tmp_path / "one"
    proc = subprocess.run(edgeft_cmd(*data, "--batch-size", "2", "--num-processes", "2", "--output", str(two)),
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 4 steps") == 1  # rank 0 alone prints the summary
    train_here(*data, "--batch-size", "4", "--output", str(one))

    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name
    assert losses(two, "loss") == pytest.approx(losses(one, "loss"), rel=1e-5)
    assert losses(two, "eval_loss") == pytest.approx(losses(one, "eval_loss"), rel=1e-5)
    record = json.loads((two / "edgeft-run.json").read_text())
    assert record["processes"] == 2 and record["status"] == "completed"
    assert len(record["final_metrics"]["peak_memory_mb_per_process"]) == 2
    assert record["final_metrics"]["tokens"] == json.loads((one / "edgeft-run.json").read_text())["final_metrics"]["tokens"]


def _descendants(pid: int) -> list[int]:
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


def _rank_pid(launcher: int, rank: int) -> int:
    for pid in _descendants(launcher):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"LOCAL_RANK=%d" % rank in environ:
            return pid
    raise AssertionError(f"no rank {rank} under {launcher}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the ranks")
def test_kill_9_of_one_rank_ends_the_run_and_resume_continues_on_one_process(tmp_path, tiny_llama_dir, task_file):
    out = tmp_path / "run"
    data = ["--model", str(tiny_llama_dir), "--data", str(task_file), *COMMON, "--eval-every", "0",
            "--save-every", "3", "--dist-timeout", "30"]
    proc = subprocess.Popen(torchrun_cmd(2, *data, "--batch-size", "2", "--max-steps", "5000", "--output", str(out)),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list((out / "checkpoints").glob("step-*/state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.1)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)  # well within --dist-timeout: the peer's loss is seen at once
    assert proc.returncode != 0
    assert "edgeft: error: rank 0: another process of this run stopped" in stderr, stderr[-3000:]

    ckpt = max((out / "checkpoints").glob("step-*/state.json")).parent
    step = json.loads((ckpt / "state.json").read_text())["step"]
    # Written by 2 processes x batch 2; continued by 1 process x batch 4 (the same rows per step).
    train_here(*data, "--batch-size", "4", "--max-steps", str(step + 2), "--output", str(out), "--resume")
    record = json.loads((out / "edgeft-run.json").read_text())
    assert record["status"] == "completed" and record["steps"] == step + 2 and record["processes"] == 1
    steps = [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == list(range(1, step + 3))  # the killed run's lines up to its checkpoint, then the resumed ones


def test_an_error_on_rank_0_ends_every_rank_with_one_line(tmp_path, tiny_llama_dir, task_file):
    out = tmp_path / "empty"
    out.mkdir()
    proc = subprocess.run(edgeft_cmd("--model", str(tiny_llama_dir), "--data", str(task_file), *COMMON, "--batch-size",
                                     "2", "--num-processes", "2", "--output", str(out), "--resume"),
                          env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert sum("--resume: no complete checkpoint" in ln for ln in lines) == 2, proc.stderr  # one line per rank
    assert lines[-1].startswith("edgeft: error: --num-processes 2: training stopped")
    assert not any(ln.startswith("Traceback") for ln in lines)


def test_shard_gives_each_rank_every_other_row_and_an_empty_share_weight_zero():
    rows = ["a", "b", "c"]
    assert shard(World(0, 2), rows) == (["a", "c"], 1.0)
    assert shard(World(1, 2), rows) == (["b"], 1.0)
    assert shard(World(1, 2), ["a"]) == (["a"], 0.0)  # still runs a forward, so DDP's all-reduce happens
    assert shard(World(), rows) == (rows, 1.0)


def test_resume_needs_the_same_rows_per_micro_batch():
    assert resume_batch_problem(2, 2, 4, 1) is None
    assert resume_batch_problem(4, 1, 1, 4) is None
    assert "use --batch-size 4" in resume_batch_problem(2, 2, 2, 1)
    assert "use --batch-size" not in resume_batch_problem(3, 1, 1, 2)


def test_relay_keeps_rank_lines_and_drops_torchrun_reports():
    torchrun = ("step 1/2  loss 1.0\n"
                "W1130 13:04:55.615000 31286 torch/distributed/elastic/multiprocessing/api.py:1028] Sending SIGTERM\n"
                "edgeft: error: rank 0: another process of this run stopped\n"
                "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
                "============================================================\n"
                "edgeft: error: rank 1: boom\n")
    sink = io.StringIO()
    relay_rank_lines(io.StringIO(torchrun), sink)
    assert sink.getvalue().splitlines() == ["step 1/2  loss 1.0", "edgeft: error: rank 0: another process of this run stopped",
                                            "edgeft: error: rank 1: boom"]
