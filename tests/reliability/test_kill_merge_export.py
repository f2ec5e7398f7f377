"""kill -9 during merge and during each export, then the same command again.

The real CLI runs in a subprocess and is killed once its write has started (a ``.partial``
sibling of the output exists) plus a random moment, or once GGUF verification has started.
Afterwards nothing may sit under the final name unless it is whole, with a passed record bound
to its bytes; re-running the very same command (no ``--overwrite``) must clear the leftovers
and finish with a passed record.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from conftest import make_tiny_llama
from edgeft.cli import cli
from edgeft.core.records import passed_and_bound, record_path

ROOT = Path(__file__).resolve().parents[2]
RNG = random.Random(os.getpid())


def partials(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".*.partial"))


def kill_9(args: list[str], ready: Callable[[], bool], log: Path, max_delay: float) -> float:
    """Run ``edgeft ARGS``; once ``ready()`` holds, wait a random moment, then SIGKILL it. Returns the delay."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgeft.cli", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.time() + 300
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    delay = RNG.uniform(0, max_delay)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill (rc {proc.returncode}): {log.read_text()[-800:]}"
    return delay


def kill_then_rerun(args: list[str], out: Path, ready: Callable[[], bool], max_delay: float, log: Path) -> None:
    delay = kill_9(args, ready, log, max_delay)
    # Killed: nothing half-written under the final name (whole with a bound passed record, or absent).
    assert not out.exists() or passed_and_bound(out), f"killed {delay:.2f}s in: {out} left without a passed record"
    assert out.exists() or partials(out.parent), "the write had started, so a leftover is expected"

    result = CliRunner().invoke(cli, args)  # the same command, no --overwrite
    assert result.exit_code == 0, f"killed {delay:.2f}s in; rerun: {result.output[-800:]}"
    assert passed_and_bound(out), record_path(out)
    assert partials(out.parent) == []  # the rerun removed what the killed run left


def test_kill_9_during_merge(tmp_path, tiny_lora_adapter):
    out = tmp_path / "merged"
    args = ["merge", "--adapter", str(tiny_lora_adapter), "--output", str(out)]
    kill_then_rerun(args, out, lambda: bool(partials(tmp_path)), 0.3, tmp_path / "stderr.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "stderr.txt"]


def test_kill_9_during_onnx_export(tmp_path, tiny_llama_dir):
    pytest.importorskip("optimum.onnxruntime")
    out = tmp_path / "onnx"
    args = ["export", "onnx", "--model", str(tiny_llama_dir), "--output", str(out)]
    kill_then_rerun(args, out, lambda: bool(partials(tmp_path)), 1.5, tmp_path / "stderr.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "stderr.txt"]


@pytest.fixture(scope="module")
def q8_llama_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    # q8_0 passes its bars on this one (top-1 0.95 against 0.93 measured); on the default
    # tiny model's larger weights it reaches 0.91, and a failed record is not what is tested here.
    return make_tiny_llama(tmp_path_factory.mktemp("q8_llama"), smol_tokenizer_dir, init_std=0.1)


@pytest.mark.parametrize("qtype, point", [("f16", "write"), ("q8_0", "write"), ("f16", "verify")])
def test_kill_9_during_gguf_export(tmp_path, tiny_llama_dir, q8_llama_dir, qtype, point):
    """f16 is written directly; q8_0 goes through a lossless intermediate and llama.cpp's quantizer."""
    pytest.importorskip("llama_cpp")
    out_dir = tmp_path / "out"
    out, log = out_dir / f"tiny.{qtype}.gguf", tmp_path / "stderr.txt"
    model = q8_llama_dir if qtype == "q8_0" else tiny_llama_dir
    args = ["export", "gguf", "--model", str(model), "--output", str(out), "--type", qtype]
    if point == "write":
        ready = lambda: out_dir.is_dir() and bool(partials(out_dir))  # noqa: E731
    else:
        ready = lambda: "verifying" in log.read_text()  # noqa: E731
    kill_then_rerun(args, out, ready, 0.1 if point == "write" else 0.3, log)
    assert sorted(p.name for p in out_dir.iterdir()) == [f"tiny.{qtype}.Modelfile", out.name, out.name + ".verify.json"]


def test_only_leftovers_of_dead_writers_are_removed(tmp_path):
    from edgeft.core.fsutil import atomic_file

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    names = {"dead": f".model.gguf.{dead_pid}.partial", "dead_intermediate": f".model.gguf.{dead_pid}.intermediate.partial",
             "live": f".model.gguf.{live_pid}.partial", "other_file": f".model.gguf.verify.json.{dead_pid}.partial"}
    for name in names.values():
        (tmp_path / name).write_text("left over")
    with atomic_file(tmp_path / "model.gguf") as tmp:
        tmp.write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.gguf", names["live"], names["other_file"]])
