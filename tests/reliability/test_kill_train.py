"""kill -9 during training, then --resume: nothing finished is lost and the result matches."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

STEPS, SAVE_EVERY = 12, 3


def train_args(model, data, out):
    return [sys.executable, "-m", "edgeft.cli", "train", "--model", str(model), "--data", str(data), "--output", str(out),
            "--method", "lora", "--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--eval-every", "0",
            "--batch-size", "4", "--max-seq-len", "64", "--lr", "5e-3", "--seed", "3", "--threads", "1"]


def steps_logged(out: Path) -> int:
    from edgeft.train import read_metrics

    return max((m.get("step", 0) for m in read_metrics(out / "metrics.jsonl")), default=0)


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path, tiny_llama_dir, task_file):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    ref = tmp_path / "ref"
    subprocess.run(train_args(tiny_llama_dir, task_file, ref), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    kill_at = random.Random(os.getpid()).randint(SAVE_EVERY + 1, STEPS - 2)
    proc = subprocess.Popen(train_args(tiny_llama_dir, task_file, out), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while steps_logged(out) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_step = steps_logged(out)
    assert killed_step < STEPS, "the run finished before it could be killed"
    assert not (out / "adapter_model.safetensors").exists()  # no final artifact from a killed run

    r = subprocess.run(train_args(tiny_llama_dir, task_file, out) + ["--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    resumed_from = int(r.stderr.split("resumed from step-")[1].split()[0])
    assert killed_step - resumed_from <= SAVE_EVERY  # at most one checkpoint interval of work lost

    from safetensors.torch import load_file

    a, b = load_file(ref / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst  # same data order, schedule and dropout RNG: identical up to float noise
    from edgeft.train import read_metrics

    ref_lr = [m["lr"] for m in read_metrics(ref / "metrics.jsonl") if "lr" in m]
    got_lr = [m["lr"] for m in read_metrics(out / "metrics.jsonl") if "lr" in m]
    assert got_lr == pytest.approx(ref_lr)
