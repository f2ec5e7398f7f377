"""Data-parallel training on CPU: two gloo processes on a tiny model, launched the ways users launch them
(``edgeft train --num-processes 2``, ``torchrun -m edgeft``, two ``--nnodes 2`` "nodes" on loopback),
replicated (DDP) and sharded (FSDP), against one process."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.config import TrainConfig
from edgeft.core.errors import EdgeftError
from edgeft.train.checkpoint import resume_batch_problem
from edgeft.train.distributed import World, peers_lost_as_error, shard
from edgeft.train.launch import relay_rank_lines, rendezvous_args, torchrun_command

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


def test_sigterm_from_the_launcher_is_the_lost_peer_line_and_the_handler_is_restored(tmp_path):
    """torchrun SIGTERMs the surviving ranks the moment one dies, often before they reach a collective."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(EdgeftError, match=r"rank 0: another process of this run stopped .*--resume"):
        with peers_lost_as_error(World(rank=0, size=2), tmp_path):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode, long before this ends
    assert signal.getsignal(signal.SIGTERM) is before


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


# Sharded (FSDP) and multi-node runs: the same four steps as one process at batch 4, checkpoint at step 2.
STEPS = ["--max-steps", "4", "--grad-accum", "2", "--eval-every", "2", "--save-every", "2"]


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_weights(a: Path, b: Path, name: str = "adapter_model.safetensors") -> None:
    from safetensors.torch import load_file

    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert x.keys() == y.keys()  # a tied output head is written once, as one process writes it
    for key in x:
        assert (x[key] - y[key]).abs().max().item() < 1e-5, key


def assert_same_losses(a: Path, b: Path) -> None:
    assert losses(b, "loss") == pytest.approx(losses(a, "loss"), rel=1e-5)
    assert losses(b, "eval_loss") == pytest.approx(losses(a, "eval_loss"), rel=1e-5)


@pytest.fixture(scope="module")
def lora_args(tiny_llama_dir, task_file) -> list[str]:
    return ["--model", str(tiny_llama_dir), "--data", str(task_file), *COMMON, *STEPS]


@pytest.fixture(scope="module")
def lora_one(tmp_path_factory, lora_args) -> Path:
    out = tmp_path_factory.mktemp("lora") / "one"
    train_here(*lora_args, "--batch-size", "4", "--output", str(out))
    return out


@pytest.fixture(scope="module")
def lora_fsdp(tmp_path_factory, lora_args) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("lora") / "fsdp"
    proc = run_ok(edgeft_cmd(*lora_args, "--batch-size", "2", "--num-processes", "2", "--sharding", "fsdp",
                             "--output", str(out)))
    return out, proc


def test_fsdp_two_processes_at_batch_b_equal_one_process_at_batch_2b(lora_one, lora_fsdp):
    out, proc = lora_fsdp
    assert "lora on cpu x 2 processes (FSDP, global batch 8)" in proc.stderr  # the weights really were sharded
    assert proc.stdout.count("trained 4 steps") == 1
    assert_same_weights(lora_one, out)
    assert_same_losses(lora_one, out)
    record = json.loads((out / "edgeft-run.json").read_text())
    assert record["processes"] == 2 and record["config"]["sharding"] == "fsdp" and record["status"] == "completed"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_fsdp_full_and_qlora_equal_one_process(tmp_path, lora_args, method):
    """Full fine-tuning: every weight sharded (the model file gathered whole); QLoRA: the 4-bit base
    kept whole on each process, the LoRA and 32-bit weights sharded."""
    args = [*lora_args, "--method", method, "--lr", "1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = run_ok(edgeft_cmd(*args, "--batch-size", "2", "--num-processes", "2", "--sharding", "fsdp",
                             "--output", str(two)))
    assert "x 2 processes (FSDP" in proc.stderr
    train_here(*args, "--batch-size", "4", "--output", str(one))
    assert_same_weights(one, two, "model.safetensors" if method == "full" else "adapter_model.safetensors")
    assert_same_losses(one, two)


def test_resume_from_an_fsdp_checkpoint_on_one_process(tmp_path, lora_args, lora_one, lora_fsdp):
    """The FSDP checkpoint (weights and AdamW moments gathered whole) continues on 1 process x batch 4
    to the adapter the uninterrupted one-process run ends with."""
    out = tmp_path / "resumed"
    shutil.copytree(lora_fsdp[0], out)
    train_here(*lora_args, "--batch-size", "4", "--output", str(out), "--resume")
    assert_same_weights(lora_one, out)
    assert_same_losses(lora_one, out)
    record = json.loads((out / "edgeft-run.json").read_text())
    assert record["processes"] == 1 and record["steps"] == 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_equal_one_process_at_batch_2b(tmp_path, lora_args, lora_one):
    """Two `edgeft train --nnodes 2` commands, one per "node", meet at node 0 (torchrun's static rendezvous)."""
    out, port = tmp_path / "two-nodes", str(free_port())
    nodes = [subprocess.Popen(edgeft_cmd(*lora_args, "--batch-size", "2", "--num-processes", "1", "--nnodes", "2",
                                         "--node-rank", str(k), "--master-addr", "127.0.0.1", "--master-port", port,
                                         "--output", str(out)),
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (0, 1)]
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, results):
        assert node.returncode == 0, stderr[-3000:]
    assert "trained 4 steps" in results[0][0] and "trained" not in results[1][0]  # node 0 has rank 0
    assert_same_weights(lora_one, out)
    assert_same_losses(lora_one, out)
    assert json.loads((out / "edgeft-run.json").read_text())["processes"] == 2


@pytest.mark.parametrize("args, expected", [
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2: must be 0 .. 1 with --nnodes 2"),
    (["--nnodes", "0"], "--nnodes must be >= 1, got 0"),
    (["--nnodes", "2", "--node-rank", "1"], "--nnodes 2 needs --master-addr"),
    (["--master-port", "70000"], "--master-port must be a TCP port"),
    (["--sharding", "fsdp", "--method", "prompt-tuning", "--optimizer", "adamw"], "--sharding fsdp supports --method"),
    (["--sharding", "fsdp"], "--sharding fsdp needs --optimizer adamw"),
])
def test_bad_multi_node_and_sharding_values_are_one_line_errors(task_file, tmp_path, args, expected):
    result = CliRunner().invoke(cli, ["train", "--data", str(task_file), "--output", str(tmp_path / "o"), *args])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.output
    assert not (tmp_path / "o").exists()


def test_torchrun_gets_the_static_rendezvous_of_a_multi_node_run(tmp_path):
    node = TrainConfig(nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29400, dist_timeout=90)
    cmd = torchrun_command(4, tmp_path / "c.json", resume=False, overwrite=False, rendezvous=rendezvous_args(node))
    assert cmd[1:9] == ["-m", "torch.distributed.run", "--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1",
                        "--master-port=29400", "--rdzv-conf=timeout=90", "--nproc-per-node=4"]
    assert rendezvous_args(TrainConfig()) == ["--standalone"]


def test_relay_returns_torchrun_own_error_when_no_rank_printed_one():
    """A node that cannot reach node 0: torchrun's traceback and C++ trace are dropped, its error kept."""
    torchrun = ("[E1130 15:18:36.664846014 socket.cpp:1028] [c10d] The client socket has timed out\n"
                "Exception raised from throwTimeoutError at socket.cpp:1030 (most recent call first):\n"
                "frame #0: c10::Error::Error(c10::SourceLocation) + 0x9d (0x7f58 in libc10.so)\n"
                "<omitting python frames>\n"
                "\n"
                "Traceback (most recent call last):\n  File \"run.py\", line 1\n"
                "torch.distributed.DistNetworkError: The client socket has timed out after 3000ms while trying "
                "to connect to (127.0.0.1, 29779).\n")
    sink = io.StringIO()
    assert relay_rank_lines(io.StringIO(torchrun), sink).startswith(
        "torch.distributed.DistNetworkError: The client socket has timed out")
    assert sink.getvalue() == ""
    assert relay_rank_lines(io.StringIO("edgeft: error: rank 0: boom\n" + torchrun), io.StringIO()) is None
