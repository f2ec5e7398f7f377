"""Quantized GGUFs calibrated on the user's rows: the importance matrix, its effect, and bad input.

A tiny llama with hidden size 256 (so the k-quants apply to every matrix, no q5/q8 fallback hides
a bug) and a few planted outlier channels: the embedding scales those hidden dimensions up, as
SmolLM2's first-token activations are, so per-column importance matters to the quantizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_llama

pytest.importorskip("llama_cpp")

OUTLIERS = (3, 77, 150, 201)


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory, smol_tokenizer_dir) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    out = make_tiny_llama(tmp_path_factory.mktemp("outliers"), smol_tokenizer_dir, hidden=256, seed=4, init_std=0.05)
    weights = load_file(out / "model.safetensors")
    emb = weights["model.embed_tokens.weight"]
    emb[:, list(OUTLIERS)] *= 30.0  # a few hidden dimensions carry activations far above the rest
    weights["model.embed_tokens.weight"] = emb.contiguous()
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    assert torch.isfinite(emb).all()
    return out


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    return task_rows(tmp_path_factory.mktemp("calib") / "train.jsonl", 80, seed=11)


def task_rows(path: Path, n: int, *, seed: int) -> Path:
    """``n`` rows of the built-in task, as JSONL at ``path``."""
    from edgeft.tasks import make_rows

    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, seed=seed)))
    return path


def test_importance_matrix_has_one_entry_per_quantized_input(outlier_model, calibration_file):
    from export.calibration import load_calibration
    from export.gguf.imatrix import importance_matrix
    from export.gguf.plan import plan_export

    plan = plan_export(outlier_model, outlier_model.parent / "x.gguf", "q4_k_m", False)
    calib = load_calibration(calibration_file, plan.vocab.hf_tokenizer, max_tokens=2000)
    assert calib.rows > 5 and calib.tokens >= 2000 and len(calib.sha256) == 64
    matrix = importance_matrix(plan, calib)
    quantized = {t.gguf_name: t.shape for t in plan.tensors if len(t.shape) == 2 and t.gguf_name != "token_embd.weight"}
    assert set(matrix) == set(quantized)  # every name is a GGUF tensor of the file, none missing
    for name, values in matrix.items():
        assert values.shape == (quantized[name][1],) and values.dtype == np.float32  # in_features long
        assert np.isfinite(values).all() and (values >= 0).all()
    # the planted channels dominate the inputs of the first attention block
    q = matrix["blk.0.attn_q.weight"]
    assert set(np.argsort(q)[-len(OUTLIERS):]) == set(OUTLIERS)


def test_calibration_changes_the_bytes_and_lowers_the_error(outlier_model, calibration_file, tmp_path):
    import gguf

    from export.gguf import export_gguf

    plain = export_gguf(outlier_model, tmp_path / "plain.gguf", qtype="q4_k_m")
    calibrated = export_gguf(outlier_model, tmp_path / "cal.gguf", qtype="q4_k_m", calibration=calibration_file)
    a, b = (tmp_path / "plain.gguf").read_bytes(), (tmp_path / "cal.gguf").read_bytes()
    assert a != b
    imatrix = calibrated.metrics["quantization"]["imatrix"]
    assert imatrix["rows"] > 5 and imatrix["entries"] == 14 and imatrix["file"].endswith("train.jsonl")
    assert plain.metrics["quantization"]["imatrix"] is None
    # recorded in the GGUF too, as llama-quantize records it
    fields = gguf.GGUFReader(str(tmp_path / "cal.gguf")).fields
    assert fields["quantize.imatrix.entries_count"].contents() == 14
    assert "train.jsonl" in fields["quantize.imatrix.dataset"].contents()
    kl_plain = next(c.value for c in plain.checks if c.name == "mean_kl")
    kl_cal = next(c.value for c in calibrated.checks if c.name == "mean_kl")
    assert kl_cal < 0.9 * kl_plain, (kl_plain, kl_cal)


def test_q8_0_takes_no_importance_matrix(outlier_model, calibration_file, tmp_path):
    from export.gguf import export_gguf

    rec = export_gguf(outlier_model, tmp_path / "q8.gguf", qtype="q8_0", calibration=calibration_file)
    assert rec.metrics["quantization"]["imatrix"] is None  # llama.cpp's q8_0 ignores one


def test_gptq_rounds_onto_q8_0s_grid_with_less_output_error_than_rounding():
    import torch

    from export.gptq import Q8_0, round_onto_grid, round_to_nearest

    BLOCK = Q8_0.block

    g = torch.Generator().manual_seed(0)
    # correlated inputs (a layer's activations span few directions: what the compensation exploits)
    x = torch.randn(2000, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 128, generator=g, dtype=torch.float64)
    x += 0.1 * torch.randn(2000, 128, generator=g, dtype=torch.float64)
    x[:, [5, 70]] *= 40.0  # outlier input channels, as calibration rows of a real model carry
    x[:, 100] = 0  # an input the rows never use
    h = x.T @ x / len(x)
    w = torch.randn(48, 128, generator=g, dtype=torch.float64) * 0.05
    q = round_onto_grid(w, h, Q8_0)
    blocks = q.reshape(48, -1, BLOCK)
    scale = (blocks.abs().amax(2, keepdim=True) / 127)
    steps = blocks / torch.where(scale == 0, torch.ones_like(scale), scale)
    assert torch.equal(steps, steps.round()) and steps.abs().max() == 127  # integers, each block's largest at 127
    assert torch.equal(round_to_nearest(q, Q8_0), q)  # llama.cpp's rounding leaves the values where they are
    assert q[:, 100].abs().max() == 0  # its weights cannot matter: stored as zeros

    def err(v):
        d = v - w
        return float(((d @ h) * d).sum())
    assert err(q) < 0.2 * err(round_to_nearest(w, Q8_0)), (err(q), err(round_to_nearest(w, Q8_0)))


def test_q8_0_gptq_is_stored_byte_for_byte_and_agrees_better(outlier_model, calibration_file, tmp_path):
    from export.gguf import export_gguf
    from export.gguf.tables import QuantOptions

    plain = export_gguf(outlier_model, tmp_path / "plain.gguf", qtype="q8_0", calibration=calibration_file,
                        quant_options=QuantOptions(gptq=False))
    rounded = export_gguf(outlier_model, tmp_path / "gptq.gguf", qtype="q8_0", calibration=calibration_file,
                          quant_options=QuantOptions(gptq=True))
    assert (tmp_path / "plain.gguf").read_bytes() != (tmp_path / "gptq.gguf").read_bytes()
    assert plain.metrics["quantization"]["gptq"] is None
    gptq = rounded.metrics["quantization"]["gptq"]
    assert gptq["tensors"] == 12 and gptq["rows"] > 5  # 7 linears x 2 layers, attn_v kept at f16
    assert gptq["tensors_not_reproduced"] == []  # llama.cpp stored GPTQ's values, not its own rounding
    assert gptq["output_error_vs_round_to_nearest"]["max"] < 1.0
    kl = {name: next(c.value for c in rec.checks if c.name == "mean_kl") for name, rec in (("plain", plain), ("gptq", rounded))}
    assert kl["gptq"] < kl["plain"], kl


@pytest.mark.parametrize("args, message", [
    (["--type", "q4_k_m", "--gptq", "--calibration", "CALIB"], "--gptq rounds onto q8_0's grid"),
    (["--type", "q8_0", "--gptq"], "--gptq needs --calibration FILE"),
])
def test_gptq_refusals_are_one_line(outlier_model, calibration_file, tmp_path, args, message):
    from click.testing import CliRunner

    from edgeft.cli import cli

    args = [str(calibration_file) if a == "CALIB" else a for a in args]
    r = CliRunner().invoke(cli, ["export", "gguf", "--model", str(outlier_model), "--output", str(tmp_path / "x.gguf"), *args])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("content, message", [
    (None, "--calibration .*missing.jsonl: file not found"),
    ("", "no usable rows"),
    ('{"text": ""}\n', "missing.jsonl:1: field 'text' is empty"),
])
def test_unusable_calibration_is_one_line(outlier_model, tmp_path, content, message):
    from edgeft.core.errors import EdgeftError
    from export.gguf import export_gguf

    path = tmp_path / "missing.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EdgeftError, match=message):
        export_gguf(outlier_model, tmp_path / "out.gguf", qtype="q4_k_m", calibration=path)
    assert not (tmp_path / "out.gguf").exists()


def point(name: str, size: int, drop: float, budget: float = 1.0, status: str = "passed") -> dict:
    return {"candidate": name, "size_bytes": size, "mean_kl": 0.01, "verification": status,
            "within_budget": status == "passed" and drop <= budget}


def test_auto_keeps_the_smaller_candidate_when_both_fit_and_the_larger_when_only_it_does():
    from export.frontier import choose

    assert choose([point("q4_k_m", 100, 0.5), point("q8_0", 180, 0.0)])["candidate"] == "q4_k_m"
    assert choose([point("q4_k_m", 100, 3.0), point("q8_0", 180, 0.0)])["candidate"] == "q8_0"
    assert choose([point("q4_k_m", 100, 0.0, status="failed"), point("q8_0", 180, 0.5)])["candidate"] == "q8_0"
    assert choose([point("q4_k_m", 100, 5.0)]) is None  # nothing fits: the caller writes f16 and says so


def judged(hits: list[bool], ref_hits: list[bool], budget: float = 1.0) -> dict:
    """A candidate's frontier point from the answers it and the reference got right on the same rows."""
    from edgeft.core.records import Record
    from export.frontier import frontier_point
    from runtime.thresholds import paired_difference_interval

    n = len(hits)
    rows = {"rows": n, "task_accuracy": sum(hits) / n, "reference_task_accuracy": sum(ref_hits) / n,
            "task_accuracy_diff": paired_difference_interval(hits, ref_hits), "top1_agreement": 0.9, "mean_kl": 0.05}
    return frontier_point("c", Record("a", "gguf", "m", metrics={"eval_rows": rows}), 1, budget)


def test_auto_needs_the_rows_to_show_the_budget_not_a_lucky_point_estimate():
    # 100 rows, the reference right on 87. The candidate flips 6 answers: 2 lost, 4 gained (+2 points), which
    # on 100 rows is within chance of a real 2-point loss: not shown within 1 point.
    ref = [True] * 87 + [False] * 13
    lucky = [False] * 2 + [True] * 85 + [True] * 4 + [False] * 9
    p = judged(lucky, ref)
    assert p["accuracy_drop_points"] == -2.0 and p["accuracy_drop_interval"][1] > 1.0 and not p["within_budget"]
    # The same rate of flips on 1000 rows with no net loss is shown within budget, and so is a candidate
    # whose answers all agree; a real loss on many rows is not.
    assert judged(lucky * 10, ref * 10)["within_budget"]
    assert judged(ref, ref)["within_budget"] and judged(ref, ref)["accuracy_drop_interval"] == [0.0, 0.0]
    lossy = [False] * 3 + [True] * 84 + [False] * 13
    assert judged(lossy * 10, ref * 10)["accuracy_drop_interval"][0] > 1.0
    assert not judged(lossy * 10, ref * 10)["within_budget"]
    assert judged(lossy * 10, ref * 10, budget=5.0)["within_budget"]


def test_nothing_fits_names_the_closest_candidate_and_its_interval():
    from export.frontier import nothing_fits

    ref = [True] * 87 + [False] * 13
    p = judged([False] * 2 + [True] * 85 + [True] * 4 + [False] * 9, ref)
    line = nothing_fits([p], 1.0, "f16")
    assert "on 100 rows" in line and "95% interval" in line and line.endswith("writing f16") and "\n" not in line


def test_auto_search_writes_the_chosen_file_its_frontier_and_modelfile(outlier_model, calibration_file, tmp_path):
    from edgeft.core.records import read_record
    from export.gguf.auto import export_gguf_auto

    evals = task_rows(tmp_path / "eval.jsonl", 6, seed=12)
    out = tmp_path / "model.gguf"
    rec = export_gguf_auto(outlier_model, out, max_accuracy_drop=100.0, eval_data=evals, calibration=calibration_file,
                           candidates=(("q8_0", False), ("q4_k_m", True)))
    auto = rec.metrics["auto"]
    assert auto["chosen"] == "q4_k_m-imatrix"  # both fit a 100-point budget: the smaller one is kept
    assert [p["candidate"] for p in auto["frontier"]] == ["q4_k_m-imatrix", "q8_0"]  # by size
    assert read_record(out)["status"] == rec.status and (tmp_path / "model.frontier.png").stat().st_size > 1000
    assert "FROM ./model.gguf" in (tmp_path / "model.Modelfile").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model")) == [
        "model.Modelfile", "model.frontier.png", "model.gguf", "model.gguf.verify.json"]


def test_bad_budget_is_refused(tmp_path, outlier_model):
    from click.testing import CliRunner

    from edgeft.cli import cli

    r = CliRunner().invoke(cli, ["export", "gguf", "--model", str(outlier_model), "--output", str(tmp_path / "x.gguf"),
                                 "--type", "auto", "--max-accuracy-drop", "-1"])
    assert r.exit_code == 2 and "--max-accuracy-drop" in r.output


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_onto_onnxruntimes_grid_is_stored_unchanged_by_its_quantizer(bits, tmp_path):
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from export.gptq import ort_symmetric, output_error, round_onto_grid, round_to_nearest
    from export.onnx.gptq import not_reproduced
    from export.onnx.quantize import run_quantizer

    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2000, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 128, generator=g, dtype=torch.float64)
    x += 0.1 * torch.randn(2000, 128, generator=g, dtype=torch.float64)
    x[:, [5, 70]] *= 40.0
    h = x.T @ x / len(x)
    w = torch.randn(48, 128, generator=g, dtype=torch.float64) * 0.05
    grid = ort_symmetric(bits, 32)
    q = round_onto_grid(w, h, grid)
    assert torch.equal(round_to_nearest(q, grid), q)
    assert output_error(q, w, h) < 0.5 * output_error(round_to_nearest(w, grid), w, h)

    def quantized(weight) -> Path:
        """onnxruntime's own round to nearest (symmetric) of a one-MatMul graph holding ``weight``."""
        node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0/mlp/up_proj/MatMul")
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])],
                                  [numpy_helper.from_array(weight.float().T.contiguous().numpy(), "w")])
        model = run_quantizer(MatMulNBitsQuantizer(helper.make_model(graph), bits=bits, block_size=32,
                                                   is_symmetric=True, op_types_to_quantize=("MatMul",)))
        path = tmp_path / f"{bits}-{len(list(tmp_path.iterdir()))}.onnx"
        onnx.save(model, str(path))
        return path

    ordered = round_onto_grid(w, h, grid, act_order=True)  # outlier inputs first: less error again
    assert torch.equal(round_to_nearest(ordered, grid), ordered)
    assert output_error(ordered, w, h) < 0.5 * output_error(q, w, h)

    name = "model.layers.0.mlp.up_proj.weight"
    assert not_reproduced(quantized(q), {name: q.float()}) == []  # GPTQ's values, stored as they are
    assert not_reproduced(quantized(ordered), {name: ordered.float()}) == []
    assert not_reproduced(quantized(w), {name: w.float()}) == ["model.layers.0.mlp.up_proj"]  # rounded: caught


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_onnx_gptq_is_stored_as_rounded_and_agrees_better(variant, outlier_model, calibration_file, tmp_path):
    from export.onnx import export_onnx

    plain = export_onnx(outlier_model, tmp_path / "plain", quantize=variant, calibration=calibration_file, gptq=False)
    rounded = export_onnx(outlier_model, tmp_path / "gptq", quantize=variant, calibration=calibration_file, gptq=True)
    gptq = rounded.metrics["quantizer"]["gptq"]
    assert "gptq" not in plain.metrics["quantizer"]
    assert gptq["tensors"] == 14 and gptq["rows"] > 5  # 7 linears x 2 layers
    assert gptq["tensors_not_reproduced"] == []  # onnxruntime stored GPTQ's values, not its own rounding
    assert gptq["output_error_vs_round_to_nearest"]["max"] < 1.0
    if variant == "int4":
        assert rounded.metrics["quantizer"]["algorithm"] == "rtn" and rounded.metrics["quantizer"]["symmetric"]
    kl = {name: next(c.value for c in rec.checks if c.name == "mean_kl") for name, rec in (("plain", plain), ("gptq", rounded))}
    if variant == "int4":  # 8-bit weights lose little here: the activations' 8-bit compute decides int8's KL
        assert kl["gptq"] < 0.8 * kl["plain"], kl


def test_onnx_int4_eight_bit_keeps_the_named_layers_at_8_bits_and_agrees_better(outlier_model, calibration_file,
                                                                               tmp_path):
    from export.onnx import export_onnx

    default = export_onnx(outlier_model, tmp_path / "int4", quantize="int4", calibration=calibration_file)
    more = export_onnx(outlier_model, tmp_path / "up8", quantize="int4", calibration=calibration_file,
                       eight_bit=("up_proj", r"layers\.1\.self_attn\.q_proj"))
    q = {name: rec.metrics["quantizer"] for name, rec in (("default", default), ("more", more))}
    # 2 layers: up_proj in both and layer 1's q_proj join the 8-bit pass (down, v, k already there)
    assert q["more"]["eight_bit_nodes"] == q["default"]["eight_bit_nodes"] + 3
    assert list(q["more"]["int4"]["higher_precision"])[-2:] == ["up_proj", r"layers\.1\.self_attn\.q_proj"]
    assert q["more"]["gptq"]["tensors_not_reproduced"] == []  # GPTQ rounded them onto the 8-bit grid too
    assert more.metrics["size_bytes"] > default.metrics["size_bytes"]
    kl = {name: next(c.value for c in rec.checks if c.name == "mean_kl") for name, rec in (("default", default),
                                                                                         ("more", more))}
    assert kl["more"] < kl["default"], kl


@pytest.mark.parametrize("args,message", [
    (["--quantize", "int8", "--eight-bit", "up_proj"], "--eight-bit: only int4"),
    (["--quantize", "int4", "--eight-bit", "up_proj("], "--eight-bit 'up_proj(': not a regular expression"),
    (["--quantize", "int4", "--eight-bit", "no_such_proj"], "--eight-bit 'no_such_proj': matches no linear layer"),
    (["--quantize", "auto", "--eight-bit", "up_proj", "--eval-data", "CALIB"], "--eight-bit: --quantize auto measures"),
])
def test_onnx_eight_bit_refusals_are_one_line(outlier_model, calibration_file, tmp_path, args, message):
    from click.testing import CliRunner

    from edgeft.cli import cli

    args = [str(calibration_file) if a == "CALIB" else a for a in args]
    result = CliRunner().invoke(cli, ["export", "onnx", "--model", str(outlier_model), "--output", str(tmp_path / "o"), *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,message", [
    (["--quantize", "int8", "--gptq"], "--gptq needs --calibration FILE"),
    (["--quantize", "fp16", "--gptq", "--calibration", "CALIB"], "--gptq: only the quantized variants"),
    (["--quantize", "auto", "--gptq", "--eval-data", "CALIB"], "--gptq/--no-gptq: --quantize auto measures"),
])
def test_onnx_gptq_refusals_are_one_line(outlier_model, calibration_file, tmp_path, args, message):
    from click.testing import CliRunner

    from edgeft.cli import cli

    args = [str(calibration_file) if a == "CALIB" else a for a in args]
    result = CliRunner().invoke(cli, ["export", "onnx", "--model", str(outlier_model), "--output", str(tmp_path / "o"), *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_onnx_auto_keeps_the_smallest_passing_variant_with_its_frontier(outlier_model, calibration_file, tmp_path):
    from edgeft.core.records import passed_and_bound, read_record
    from export.onnx.auto import FRONTIER_PNG, export_onnx_auto

    evals = task_rows(tmp_path / "eval.jsonl", 6, seed=12)
    out = tmp_path / "onnx-auto"
    rec = export_onnx_auto(outlier_model, out, max_accuracy_drop=100.0, eval_data=evals, calibration=calibration_file,
                           candidates=(("fp16", False), ("int8", True)))
    auto = rec.metrics["auto"]
    sizes = {p["candidate"]: p["size_bytes"] for p in auto["frontier"]}
    assert sorted(sizes) == ["fp16", "int8-smoothed-gptq"] and all(p["within_budget"] for p in auto["frontier"])
    calibrated = next(p for p in auto["frontier"] if p["candidate"] == "int8-smoothed-gptq")
    assert calibrated["gptq"] and calibrated["smoothed"]
    # Both fit a 100-point budget: the smaller is kept. On this tiny model (49k vocabulary, hidden 256) that
    # is fp16: int8 unties the logits projection from the embedding to quantize it, a second matrix.
    smaller = min(sizes, key=sizes.get)
    assert auto["chosen"] == smaller == auto["frontier"][0]["candidate"]
    assert rec.metrics["variant"] == smaller.removesuffix("-smoothed-gptq")
    assert passed_and_bound(out) and read_record(out)["metrics"]["auto"]["chosen"] == smaller
    assert (out / FRONTIER_PNG).stat().st_size > 1000
    assert not list(tmp_path.glob(".onnx-auto*"))  # the candidates tried are gone


def test_onnx_auto_writes_fp16_when_no_quantized_variant_passes(outlier_model, tmp_path, monkeypatch):
    import export.onnx as onnx_export
    from export.onnx.auto import export_onnx_auto

    bars = dict(onnx_export.BARS)
    bars["int8"] = onnx_export.Bars(top1=1.01, mean_kl=bars["int8"].mean_kl, max_size_ratio=bars["int8"].max_size_ratio)
    monkeypatch.setattr(onnx_export, "BARS", bars)  # int8 cannot pass: nothing quantized is within budget
    evals = task_rows(tmp_path / "eval.jsonl", 4, seed=13)
    rec = export_onnx_auto(outlier_model, tmp_path / "o", max_accuracy_drop=1.0, eval_data=evals,
                           candidates=(("int8", False), ("int8", True)))  # no calibration: the smoothed one is skipped
    assert rec.metrics["auto"]["chosen"] == "fp16" and rec.metrics["variant"] == "fp16"
    assert [p["candidate"] for p in rec.metrics["auto"]["frontier"]] == ["int8"]
    assert not rec.metrics["auto"]["frontier"][0]["within_budget"]


def test_onnx_auto_refusals_are_one_line(outlier_model, tmp_path):
    from click.testing import CliRunner

    from edgeft.cli import cli

    base = ["export", "onnx", "--model", str(outlier_model), "--output", str(tmp_path / "o"), "--quantize", "auto"]
    for args, message in (([], "--quantize auto needs --eval-data"),
                          (["--format", "genai"], "--quantize auto: only with --format onnx"),
                          (["--eval-data", str(tmp_path / "e.jsonl"), "--smooth"], "measures the calibrated candidates itself")):
        result = CliRunner().invoke(cli, [*base, *args])
        assert result.exit_code != 0 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
