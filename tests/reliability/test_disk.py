"""Low disk space is found before a merge, an export or a training save writes anything.

Free space is the one boundary mocked: ``shutil.disk_usage`` as ``edgeft.core.fsutil`` sees it
reports 1 MiB free. Everything else is the real CLI on the tiny models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli

FREE = 1 << 20


@pytest.fixture
def low_disk(monkeypatch) -> list[Path]:
    """1 MiB free on every filesystem; returns the paths probed."""
    probed: list[Path] = []

    def disk_usage(path):
        probed.append(Path(path))
        return shutil._ntuple_diskusage(total=1 << 40, used=(1 << 40) - FREE, free=FREE)

    monkeypatch.setattr("edgeft.core.fsutil.shutil.disk_usage", disk_usage)
    return probed


def invoke(*args: object):
    return CliRunner().invoke(cli, list(map(str, args)))


def disk_error(result, what: str, target: Path) -> int:
    """Check the one-line error and return the MiB it says are needed."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("edgeft:")]
    assert len(lines) == 1, result.output
    prefix = f"edgeft: error: not enough disk space for {what} at {target}: need about "
    assert lines[0].startswith(prefix) and lines[0].endswith(", 1 MiB free"), lines[0]
    return int(lines[0][len(prefix):].split()[0])


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.mark.parametrize("command", ["merge", "onnx", "gguf"])
def test_merge_and_exports_stop_before_writing(tmp_path, low_disk, tiny_lora_adapter, tiny_llama_dir, command):
    out = tmp_path / "out" / ("model.gguf" if command == "gguf" else command)
    args, what = {
        "merge": (["merge", "--adapter", tiny_lora_adapter, "--output", out], "the merged model"),
        "onnx": (["export", "onnx", "--model", tiny_llama_dir, "--output", out], "the ONNX export"),
        "gguf": (["export", "gguf", "--model", tiny_llama_dir, "--output", out, "--type", "q8_0"], "the GGUF export"),
    }[command]
    before = tree(tmp_path)
    need = disk_error(invoke(*args), what, out)
    # the tiny model's weights are ~3.2M parameters: ~13 MiB in fp32, plus each writer's slack
    assert 12 < need < 200, need
    assert tree(tmp_path) == before  # nothing written, not even the output's parent
    assert low_disk and all(p == tmp_path for p in low_disk)  # the nearest existing directory was probed


@pytest.mark.parametrize("save_every, steps, what", [(1, 2, "checkpoint step-0000001"), (0, 1, "the adapter")])
def test_training_checks_before_each_save(tmp_path, low_disk, tiny_llama_dir, task_file, save_every, steps, what):
    out = tmp_path / "run"
    result = invoke("train", "--model", tiny_llama_dir, "--data", task_file, "--output", out, "--method", "lora",
                    "--max-steps", steps, "--save-every", save_every, "--eval-every", "0", "--max-seq-len", "64",
                    "--threads", "1")
    target = out / "checkpoints" / "step-0000001" if save_every else out
    assert disk_error(result, what, target) >= 16  # the save slack alone
    assert sorted(p.name for p in out.iterdir()) == sorted(["edgeft-run.json", "metrics.jsonl"]
                                                           + (["checkpoints"] if save_every else []))
    if save_every:
        assert list((out / "checkpoints").iterdir()) == []  # no checkpoint, no partial one
    assert json.loads((out / "edgeft-run.json").read_text())["status"] == "running"  # not marked complete
