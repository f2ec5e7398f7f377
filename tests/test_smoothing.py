"""Outlier smoothing before quantization: exact in every dtype, the outliers moved into the weights,
a lower error for the quantized file, and one-line refusals; and int8 MatMuls that read massive
activations computing on float activations.

The tiny llama has a few planted MLP channels whose activations reach ~100x the rest (``up_proj``
rows scaled up), as SmolLM2's first-token activations do at the input of ``down_proj``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_llama

HOT_CHANNELS = tuple(range(5, 512, 32))  # one per 32-value block of the 512 intermediate channels


def _plant(model_dir: Path, dtype, layers=(0, 1), factor: float = 100.0, compensate: bool = False) -> Path:
    """Scale the hot channels' ``up_proj`` rows by ``factor``; ``compensate``: and their ``down_proj``
    columns by 1/factor, so the model computes what it did, with massive inputs on small weights."""
    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    for layer in layers:
        up = weights[f"model.layers.{layer}.mlp.up_proj.weight"]
        up[list(HOT_CHANNELS)] *= factor
        if compensate:
            weights[f"model.layers.{layer}.mlp.down_proj.weight"][:, list(HOT_CHANNELS)] /= factor
    save_file({k: v.to(dtype).contiguous() for k, v in weights.items()}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="module")
def hot_model(tmp_path_factory, smol_tokenizer_dir) -> Path:
    import torch

    out = make_tiny_llama(tmp_path_factory.mktemp("hot"), smol_tokenizer_dir, hidden=256, seed=2, init_std=0.05)
    return _plant(out, torch.float32)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    from edgeft.tasks import make_rows

    path = tmp_path_factory.mktemp("calib") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(60, seed=5)))
    return path


def _logits(model_dir: Path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_smoothing_is_exact_and_moves_the_outliers_into_the_weights(hot_model, calibration_file, tmp_path,
                                                                     smol_tokenizer_dir, dtype_name):
    import torch
    from transformers import AutoTokenizer

    from export.calibration import load_calibration
    from export.smoothing import write_smoothed

    source = hot_model
    if dtype_name == "bfloat16":  # a 16-bit checkpoint: the power-of-two scales keep the fold exact
        source = make_tiny_llama(tmp_path / "bf16", smol_tokenizer_dir, hidden=256, seed=2, init_std=0.05)
        _plant(source, torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(source))
    calib = load_calibration(calibration_file, tok, max_tokens=1500)
    result = write_smoothed(source, calib, tmp_path / "smoothed", forced=True)
    assert result["outputs_identical"] and result["layers"] == [0, 1] and result["channels_scaled"] > 0
    assert result["max_down_input_after"] < result["max_down_input_before"] / 4, result
    ids = calib.sequences[-1]
    assert torch.equal(_logits(source, ids), _logits(tmp_path / "smoothed", ids))  # bit for bit
    from safetensors.torch import load_file

    before = load_file(source / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    after = load_file(tmp_path / "smoothed" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert after.dtype == before.dtype
    ratio = (after.float().abs().amax(0) / before.float().abs().amax(0).clamp(min=1e-12))
    assert all(ratio[c] > 4 for c in HOT_CHANNELS)  # the hot channels' columns grew: the outliers moved there


def test_default_smoothing_only_for_massive_activations(hot_model, tiny_llama_dir, calibration_file, tmp_path):
    """Without --smooth the fold is applied only where some channel dwarfs its layer's median."""
    from transformers import AutoTokenizer

    from export.calibration import load_calibration
    from export.smoothing import MASSIVE_RATIO, write_smoothed

    calib = load_calibration(calibration_file, AutoTokenizer.from_pretrained(str(hot_model)), max_tokens=1500)
    folded = write_smoothed(hot_model, calib, tmp_path / "hot")
    assert "skipped" not in folded and folded["ratio"] >= MASSIVE_RATIO and (tmp_path / "hot" / "config.json").is_file()
    calm = write_smoothed(tiny_llama_dir, calib, tmp_path / "calm")
    assert calm["ratio"] < MASSIVE_RATIO and "--smooth forces it" in calm["skipped"] and not (tmp_path / "calm").exists()


def test_outlying_scope_folds_only_the_layers_that_carry_outliers(tmp_path, smol_tokenizer_dir, calibration_file):
    """layers="outlying" (GGUF q4_k_m's table row) leaves a calm layer's weights byte for byte as they were."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from export.calibration import load_calibration
    from export.smoothing import write_smoothed

    source = _plant(make_tiny_llama(tmp_path / "one-hot", smol_tokenizer_dir, hidden=256, seed=2, init_std=0.05),
                    torch.float32, layers=(1,))
    calib = load_calibration(calibration_file, AutoTokenizer.from_pretrained(str(source)), max_tokens=1500)
    everywhere = write_smoothed(source, calib, tmp_path / "all", forced=True)
    outlying = write_smoothed(source, calib, tmp_path / "outlying", forced=True, layers="outlying")
    assert everywhere["layers"] == [0, 1] and outlying["layers"] == [1] and outlying["layer_scope"] == "outlying"
    before, after = (load_file(d / "model.safetensors") for d in (source, tmp_path / "outlying"))
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])
    ids = calib.sequences[-1]
    assert torch.equal(_logits(source, ids), _logits(tmp_path / "outlying", ids))


def test_smoothing_lowers_the_error_of_the_quantized_gguf(hot_model, calibration_file, tmp_path):
    from export.gguf import export_gguf
    from export.gguf.tables import QuantOptions

    plain = export_gguf(hot_model, tmp_path / "plain.gguf", qtype="q8_0", calibration=calibration_file,
                        quant_options=QuantOptions(smooth=False, gptq=False))
    smoothed = export_gguf(hot_model, tmp_path / "smooth.gguf", qtype="q8_0", calibration=calibration_file,
                           quant_options=QuantOptions(smooth=True, gptq=False))  # the smoothing alone
    record = smoothed.metrics["quantization"]["smoothing"]
    assert record["outputs_identical"] and record["file"].endswith("train.jsonl") and record["channels_scaled"] > 0
    assert plain.metrics["quantization"]["smoothing"] is None
    kl = {r: next(c.value for c in rec.checks if c.name == "mean_kl") for r, rec in (("plain", plain), ("smooth", smoothed))}
    assert kl["smooth"] < 0.8 * kl["plain"], kl
    assert not list(tmp_path.glob(".*partial"))  # the smoothed checkpoint is gone


def test_smoothing_lowers_the_error_of_onnx_int8(hot_model, calibration_file, tmp_path, monkeypatch):
    import dataclasses

    import export.onnx.quantize as quantize
    from export.onnx import export_onnx

    # the smoothing alone (float activations for massive inputs are measured on their own, below)
    monkeypatch.setattr(quantize, "INT8", dataclasses.replace(quantize.INT8, float_massive_inputs=False))
    plain = export_onnx(hot_model, tmp_path / "plain", quantize="int8", calibration=calibration_file, smooth=False)
    smoothed = export_onnx(hot_model, tmp_path / "smooth", quantize="int8", calibration=calibration_file, smooth=True)
    assert "smoothing" not in plain.metrics["quantizer"]
    assert smoothed.metrics["quantizer"]["smoothing"]["channels_scaled"] > 0
    kl = {name: rec.metrics["logits"]["mean_kl"] for name, rec in (("plain", plain), ("smooth", smoothed))}
    assert kl["smooth"] < 0.8 * kl["plain"], kl


def test_int8_computes_massive_inputs_on_float_activations(tmp_path, smol_tokenizer_dir, calibration_file, monkeypatch):
    """Only the MatMul whose input carries massive channels (planted ~1000x on weights 1000x smaller, as
    SmolLM2's first-token channels sit) leaves int8 activations, its weights still 8-bit, and the int8
    graph's error falls: quantized with the block's massive value, the other 31 inputs of the block round
    to zero."""
    import dataclasses

    import onnx
    import torch

    import export.onnx.quantize as quantize
    from export.onnx import export_onnx

    source = _plant(make_tiny_llama(tmp_path / "m", smol_tokenizer_dir, hidden=256, seed=2, init_std=0.05),
                    torch.float32, layers=(1,), factor=1000.0, compensate=True)
    on = export_onnx(source, tmp_path / "on", quantize="int8", calibration=calibration_file)
    massive = on.metrics["quantizer"]["massive_inputs"]
    assert list(massive["layers"]) == ["model.layers.1.mlp.down_proj"], massive
    assert massive["nodes"] == ["/model/layers.1/mlp/down_proj/MatMul_Q8"] and "calibration rows" in massive["measured_on"]
    graph = onnx.load(str(tmp_path / "on" / "model.onnx"), load_external_data=False).graph
    nodes = {n.name: {a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"}
    assert nodes.pop(massive["nodes"][0]) == {"K": 512, "N": 256, "accuracy_level": 0, "bits": 8, "block_size": 32}
    assert nodes and {a["accuracy_level"] for a in nodes.values()} == {4}

    monkeypatch.setattr(quantize, "INT8", dataclasses.replace(quantize.INT8, float_massive_inputs=False))
    off = export_onnx(source, tmp_path / "off", quantize="int8", calibration=calibration_file)
    assert "massive_inputs" not in off.metrics["quantizer"]
    kl = {name: rec.metrics["logits"]["mean_kl"] for name, rec in (("on", on), ("off", off))}
    assert kl["on"] < 0.5 * kl["off"], kl


@pytest.mark.parametrize("args, message", [
    (["--type", "q8_0", "--smooth"], "--smooth needs --calibration"),
])
def test_smoothing_without_calibration_is_one_line(hot_model, tmp_path, args, message):
    from click.testing import CliRunner

    from edgeft.cli import cli

    result = CliRunner().invoke(cli, ["export", "gguf", "--model", str(hot_model), "--output",
                                      str(tmp_path / "x.gguf"), *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x.gguf").exists()


def test_onnx_smoothing_refusals_are_one_line(hot_model, tmp_path):
    from click.testing import CliRunner

    from edgeft.cli import cli

    for args, message in ((["--quantize", "int8", "--smooth"], "--smooth needs --calibration"),
                          (["--smooth", "--calibration", str(tmp_path / "c.jsonl")], "only the quantized variants")):
        result = CliRunner().invoke(cli, ["export", "onnx", "--model", str(hot_model), "--output",
                                          str(tmp_path / "o"), *args])
        assert result.exit_code != 0 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
