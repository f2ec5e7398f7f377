"""Paths inside configs and data cannot make edgeft write outside the chosen output directory.

Every test snapshots the whole temporary tree, runs the real CLI with ``../`` and absolute
paths in config values and data rows, and checks that nothing appeared outside the output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli


def invoke(*args: object):
    return CliRunner().invoke(cli, list(map(str, args)))


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def written_outside(root: Path, before: set[Path], out: Path) -> list[str]:
    """New paths under ``root`` that are neither ``out``, inside it, nor a directory on the way to it."""
    return sorted(str(p) for p in tree(root) - before if p != out and out not in p.parents and p not in out.parents)


def error_line(result) -> str:
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeft: error: "), result.output
    return lines[0]


@pytest.mark.parametrize("section, key", [
    ("export: {{gguf: ['{p}']}}", "export.gguf"),
    ("export: {{onnx: ['{p}']}}", "export.onnx"),
    ("merge: {{dtype: '{p}'}}", "merge.dtype"),
    ("merge: {{policy: '{p}'}}", "merge.policy"),
    ("train: {{data: '{data}', output: '{p}'}}", "train.output"),
])
@pytest.mark.parametrize("hostile", ["../../escaped", "/{root}/escaped"])
def test_pipeline_values_cannot_name_paths(tmp_path, task_file, section, key, hostile):
    """Stage directories and artifact names come from fixed names and checked variant lists."""
    out = tmp_path / "a" / "b" / "run"
    value = hostile.format(root=str(tmp_path).strip("/"))
    config = tmp_path / "pipeline.yaml"
    text = f"output: {out}\n" + section.format(p=value, data=task_file) + "\n"
    if "train:" not in text:
        text += f"train: {{data: '{task_file}'}}\n"
    config.write_text(text)
    before = tree(tmp_path)
    result = invoke("run", "--config", config)
    assert result.exit_code == 2
    assert key in error_line(result)
    assert tree(tmp_path) == before  # refused before anything was written, output included


@pytest.fixture
def hostile_model(tmp_path, tiny_llama_dir) -> Path:
    """The tiny model with named chat templates whose names hold paths (relative and absolute).

    ``save_pretrained`` writes named templates to ``additional_chat_templates/NAME.jinja``:
    these names would land in ``tmp_path/a`` and ``tmp_path`` when saved under ``tmp_path/a/b/OUT``.
    """
    model = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": (model / "chat_template.jinja").read_text()},
                               {"name": "../../../escaped", "template": "x"},
                               {"name": str(tmp_path / "escaped-abs"), "template": "y"}]
    (model / "chat_template.jinja").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def test_chat_template_names_cannot_escape(tmp_path, hostile_model, tiny_lora_adapter, task_file):
    adapter = shutil.copytree(tiny_lora_adapter, tmp_path / "adapter")
    shutil.copy(hostile_model / "tokenizer_config.json", adapter)
    (adapter / "chat_template.jinja").unlink()
    nest = tmp_path / "a" / "b"
    commands = {
        "train": ["train", "--model", hostile_model, "--data", task_file, "--output", nest / "train", "--method", "lora",
                  "--max-steps", "1", "--max-seq-len", "64", "--threads", "1"],
        "merge": ["merge", "--adapter", adapter, "--output", nest / "merge"],
        "onnx": ["export", "onnx", "--model", hostile_model, "--output", nest / "onnx"],
    }
    for what, args in commands.items():
        before = tree(tmp_path)
        result = invoke(*args)
        assert result.exit_code == 1, (what, result.output)
        line = error_line(result)
        assert "tokenizer_config.json: chat_template name '../../../escaped' holds a path" in line, (what, line)
        out = Path(args[args.index("--output") + 1])
        assert written_outside(tmp_path, before, out) == [], what
        assert not out.exists() or list(out.iterdir()) == [], what


def test_data_rows_and_yaml_output_stay_inside(tmp_path, tiny_llama_dir):
    """Values that look like paths in data rows are text; the --output flag beats a YAML output."""
    rows = [{"instruction": f"Where is item {i}?", "output": p}
            for i, p in enumerate(["../../escaped", f"{tmp_path}/escaped-abs", "checkpoints/../../x", "~/x"] * 4)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "train.yaml"
    config.write_text("output: ../../escaped-yaml\nmethod: lora\nmax_steps: 2\nsave_every: 1\nmax_seq_len: 64\n")
    out = tmp_path / "a" / "b" / "out"
    before = tree(tmp_path)
    result = invoke("train", "--config", config, "--data", data, "--output", out, "--threads", "1",
                    "--model", tiny_llama_dir, "--eval-every", "0", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert written_outside(tmp_path, before, out) == []
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoints").is_dir()
