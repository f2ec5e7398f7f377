"""Artifacts changed after verification, and truncated GGUF files given as input.

A verification record is bound to the bytes it vouches for (size and sha256 of the weight
files), so `edgeft bench` refuses a truncated or replaced artifact exactly as it refuses a
missing or failed record. A GGUF cut short is refused as a model input with one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli

pytest.importorskip("llama_cpp")


def invoke(*args: object):
    return CliRunner().invoke(cli, list(map(str, args)))


def error_line(result) -> str:
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeft: error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def verified(tmp_path_factory, tiny_llama_dir, tiny_lora_adapter) -> dict[str, Path]:
    """A GGUF f16 export and a merged model, each with a passed record."""
    from edgeft.merge import merge_adapter
    from export.gguf import export_gguf

    root = tmp_path_factory.mktemp("verified")
    gguf, merged = root / "gguf" / "tiny.gguf", root / "merged"
    assert export_gguf(tiny_llama_dir, gguf, qtype="f16").status == "passed"
    assert merge_adapter(tiny_lora_adapter, merged).status == "passed"
    return {"gguf": gguf, "merged": merged}


def copy_gguf(src: Path, dst_dir: Path, *, record: bool = True) -> Path:
    dst_dir.mkdir()
    shutil.copy(src, dst_dir / src.name)
    if record:
        shutil.copy(src.with_name(src.name + ".verify.json"), dst_dir)
    return dst_dir / src.name


def test_bench_refuses_changed_missing_and_failed(verified, tiny_lora_adapter, tiny_llama_dir, tmp_path):
    from edgeft.core.records import Check, Record, write_record
    from runtime.bench import BenchConfig, check_inputs

    size = verified["gguf"].stat().st_size
    cut = copy_gguf(verified["gguf"], tmp_path / "cut")
    with open(cut, "r+b") as fh:
        fh.truncate(size - size // 4)  # tensor data cut short; the header is intact
    tampered = copy_gguf(verified["gguf"], tmp_path / "tampered")
    with open(tampered, "r+b") as fh:
        fh.seek(size - 4096)
        fh.write(bytes(4096))  # the last tensor's data zeroed: same size, other weights
    weights = verified["merged"] / "model.safetensors"
    shortened = shutil.copytree(verified["merged"], tmp_path / "shortened")
    with open(shortened / "model.safetensors", "r+b") as fh:
        fh.truncate(weights.stat().st_size - 1024)
    replaced = shutil.copytree(verified["merged"], tmp_path / "replaced")
    shutil.copy(tiny_llama_dir / "model.safetensors", replaced / "model.safetensors")  # the base: same size, not merged
    assert (replaced / "model.safetensors").stat().st_size == weights.stat().st_size
    unrecorded = copy_gguf(verified["gguf"], tmp_path / "unrecorded", record=False)
    failed = copy_gguf(verified["gguf"], tmp_path / "failed", record=False)
    write_record(failed, Record(str(failed), "gguf", "test", checks=[Check("top1_agreement", 0.5, 0.99)]))
    moved = copy_gguf(verified["gguf"], tmp_path / "moved")  # file and record moved together: still bound

    data = tmp_path / "eval.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    artifacts = [cut, tampered, shortened, replaced, unrecorded, failed, moved]
    result = invoke("bench", "--reference", tiny_lora_adapter, *[a for p in artifacts for a in ("--artifact", p)],
                    "--data", data, "--output", tmp_path / "report")
    assert result.exit_code == 1
    line = error_line(result)
    assert (f"--artifact {cut}: truncated GGUF: its tensor data ends at byte {size}, "
            f"the file has {size - size // 4} bytes") in line
    assert f"--artifact {tampered}: tiny.gguf has changed since it was verified" in line
    assert (f"--artifact {shortened}: model.safetensors is {weights.stat().st_size - 1024} bytes, "
            f"its verification record says {weights.stat().st_size}") in line
    assert f"--artifact {replaced}: model.safetensors has changed since it was verified" in line
    assert f"--artifact {unrecorded}: no verification record" in line
    assert f"--artifact {failed}: failed its verification (top1_agreement)" in line
    assert f"--artifact {moved}" not in line and "--allow-unverified" in line
    assert not (tmp_path / "report").exists()

    # --allow-unverified takes the verifiable ones (checked up to the point where models would run)
    cfg = BenchConfig(reference=tiny_lora_adapter, artifacts=artifacts[1:], data=data, output=tmp_path / "report",
                      allow_unverified=True)
    _, described, _ = check_inputs(cfg)
    assert [a.path for a in described] == artifacts[1:]


def test_truncated_gguf_refused_as_input(verified, task_file, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("EDGEFT_HOME", str(home))  # the conversion cache
    size = verified["gguf"].stat().st_size
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(verified["gguf"].read_bytes()[: size - 1000])
    want = f"edgeft: error: {bad}: truncated GGUF: its tensor data ends at byte {size}, the file has {size - 1000} bytes"

    result = invoke("import-gguf", bad)
    assert result.exit_code == 1 and error_line(result).startswith(want)
    result = invoke("train", "--model", bad, "--data", task_file, "--output", tmp_path / "out", "--method", "lora")
    assert result.exit_code == 1 and error_line(result).startswith(want)
    assert not home.exists()  # nothing converted, nothing cached
    assert list((tmp_path / "out").iterdir()) == []
