"""An out-of-memory during training stops with a message naming the knobs that lower memory."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def test_cpu_oom_message(tmp_path, tiny_llama_dir):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * 1500}) + "\n" for _ in range(64)))
    limit = 6 * 2**30  # address space: enough to import torch and load the tiny model, not for this batch

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-m", "edgeft.cli", "train", "--model", str(tiny_llama_dir), "--data", str(data),
                        "--output", str(tmp_path / "out"), "--method", "lora", "--batch-size", "64",
                        "--max-seq-len", "2048", "--max-steps", "1", "--no-gradient-checkpointing", "--eval-split", "0"],
                       env=env, capture_output=True, text=True, preexec_fn=cap, timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("edgeft: error: out of memory;")
    for knob in ("--batch-size", "--max-seq-len", "--gradient-checkpointing", "--method qlora"):
        assert knob in last
