"""ONNX export: a tiny llama exported through optimum and checked against PyTorch, quantized variants,
records, CLI exit codes and the exact set of files written.

One fp32, one int8 and one int4 export are shared across the module (each takes seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft.core.records import RECORD_DIR_NAME, read_record

EXPECTED_FILES = {
    "model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", RECORD_DIR_NAME,
}


def _cli(args: list[str]):
    from edgeft.cli import cli

    return CliRunner().invoke(cli, args)


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx_out")


@pytest.fixture(scope="module")
def fp32_export(tiny_llama_dir, out_root):
    from export.onnx import export_onnx

    out = out_root / "fp32"
    return out, export_onnx(tiny_llama_dir, out)


@pytest.fixture(scope="module")
def int8_export(tiny_llama_dir, out_root):
    from export.onnx import export_onnx

    out = out_root / "int8"
    return out, export_onnx(tiny_llama_dir, out, quantize="int8")


@pytest.fixture(scope="module")
def int4_cli_failed(tiny_llama_dir, out_root):
    """int4 through the CLI with a top-1 bar no model can meet: the record must say failed, exit 3."""
    import export.onnx as onnx_export

    out = out_root / "int4"
    with pytest.MonkeyPatch.context() as mp:
        bars = dict(onnx_export.BARS)
        bars["int4"] = onnx_export.Bars(top1=1.01, mean_kl=onnx_export.BARS["int4"].mean_kl,
                                        max_size_ratio=onnx_export.BARS["int4"].max_size_ratio)
        mp.setattr(onnx_export, "BARS", bars)
        result = _cli(["export", "onnx", "--model", str(tiny_llama_dir), "--output", str(out), "--quantize", "int4"])
    return out, result


def test_fp32_matches_pytorch(fp32_export):
    out, record = fp32_export
    m = record.metrics
    assert record.status == "passed", record.summary()
    assert record.kind == "onnx" and m["variant"] == "fp32"
    assert m["logits"]["positions"] >= 100  # 4 samples (one chat-formatted) x (prompt + 16 greedy tokens)
    assert m["logits"]["top1_agreement"] >= 0.99
    assert m["logits"]["max_abs_diff"] <= 1e-3  # BARS["fp32"].atol; measured ~1e-5 on this model
    assert m["kv_cache"]["top1_agreement"] == 1.0 and m["kv_cache"]["max_abs_diff"] <= 1e-3
    assert m["optimum"]["matches_reference"] is True
    assert [s["name"] for s in m["samples"]][-1] == "chat"
    assert m["size_bytes"] == (out / "model.onnx").stat().st_size
    on_disk = read_record(out)
    assert on_disk["status"] == "passed" and on_disk["metrics"]["variant"] == "fp32"
    assert {c["name"] for c in on_disk["checks"]} >= {"top1_agreement", "max_abs_diff", "kv_greedy_match", "mean_kl"}


def test_exact_files_and_no_leftovers(fp32_export, int8_export, out_root):
    for out, record in (fp32_export, int8_export):
        assert {p.name for p in out.iterdir()} == EXPECTED_FILES
        assert set(record.metrics["files"]) == EXPECTED_FILES
    assert not [p.name for p in out_root.iterdir() if p.name.startswith(".")]  # no *.partial / .old dirs


def test_loads_with_optimum_and_greedy_with_cache_equals_pytorch(fp32_export, tiny_llama_dir):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = fp32_export
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok("Once upon a time in a small village", return_tensors="pt")
    ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    ort_model = ORTModelForCausalLM.from_pretrained(out)
    assert ort_model.can_use_cache
    pt_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    kwargs = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
    got = ort_model.generate(**ids, **kwargs)
    want = pt_model.generate(**ids, **kwargs)
    assert got.tolist() == want.tolist()


def test_plain_onnxruntime_interface(fp32_export, tiny_llama_dir):
    """The names and shapes the module docstring promises to the runtime package (no optimum)."""
    import onnxruntime as ort

    out, _ = fp32_export
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "position_ids", *past]
    assert [o.name for o in sess.get_outputs()] == ["logits", *[p.replace("past_key_values", "present") for p in past]]
    shape = sess.get_inputs()[3].shape
    assert shape[1] == kv_heads and shape[3] == head_dim

    # Prefill 5 tokens, then one cached step; the step's logits equal a full 6-token run's last row.
    ids = np.array([[1, 400, 401, 402, 403, 404]], np.int64)
    empty = {p: np.zeros((1, kv_heads, 0, head_dim), np.float32) for p in past}
    run = lambda x, mask, pos, kv: dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {  # noqa: E731
        "input_ids": x, "attention_mask": mask, "position_ids": pos, **kv})))
    full = run(ids, np.ones_like(ids), np.arange(6)[None], empty)
    pre = run(ids[:, :5], np.ones((1, 5), np.int64), np.arange(5)[None], empty)
    step = run(ids[:, 5:], np.ones((1, 6), np.int64), np.array([[5]]),
               {p: pre[p.replace("past_key_values", "present")] for p in past})
    assert step["present.0.key"].shape == (1, kv_heads, 6, head_dim)
    np.testing.assert_allclose(step["logits"][0, -1], full["logits"][0, -1], atol=1e-4)


def test_int8_runs_smaller_with_record(int8_export, fp32_export):
    out, record = int8_export
    m = record.metrics
    assert m["variant"] == "int8" and record.kind == "onnx"
    assert m["size_bytes"] < fp32_export[1].metrics["size_bytes"]
    assert m["fp32_size_bytes"] == fp32_export[1].metrics["size_bytes"]  # the same fp32 graph, then quantized
    assert m["quantizer"]["method"] and m["quantizer"]["bits"] == 8
    massive = m["quantizer"]["massive_inputs"]  # measured on the sample texts: a calm model has none
    assert massive["nodes"] == [] and massive["measured_on"].endswith("sample texts")
    assert 0.0 <= m["logits"]["top1_agreement"] <= 1.0 and np.isfinite(m["logits"]["mean_kl"])
    assert m["optimum"]["generated"] is True  # loads with ORTModelForCausalLM and generates with its cache
    assert read_record(out)["status"] == record.status


def test_int4_failed_verification_writes_failed_record_and_exits_3(int4_cli_failed, fp32_export):
    out, result = int4_cli_failed
    assert result.exit_code == 3, result.output
    assert "failed verification" in result.output
    assert "hint: --activation-bits 16" in result.output  # the failed check is an agreement bar
    record = read_record(out)
    assert record["status"] == "failed" and record["metrics"]["variant"] == "int4"
    failed = {c["name"] for c in record["checks"] if not c["passed"]}
    assert "top1_agreement" in failed
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert record["metrics"]["size_bytes"] < fp32_export[1].metrics["size_bytes"]
    assert record["metrics"]["quantizer"]["bits"] == 4 and record["metrics"]["quantizer"]["block_size"] == 32


def test_existing_output_refused_without_overwrite(fp32_export, tiny_llama_dir):
    out, _ = fp32_export
    before = (out / RECORD_DIR_NAME).stat().st_mtime_ns
    result = _cli(["export", "onnx", "--model", str(tiny_llama_dir), "--output", str(out)])
    assert result.exit_code == 1
    assert "edgeft: error: --output" in result.output and "--overwrite" in result.output
    assert (out / RECORD_DIR_NAME).stat().st_mtime_ns == before


def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_is_a_clean_error(tiny_llama_dir, tmp_path):
    model = _copy_model(tiny_llama_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = _cli(["export", "onnx", "--model", str(model), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeft: error: --model")
    assert "model.safetensors is truncated" in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_and_weights_reported_together(tiny_llama_dir, tmp_path):
    model = _copy_model(tiny_llama_dir, tmp_path / "model")
    for name in ("tokenizer.json", "model.safetensors"):
        (model / name).unlink()
    result = _cli(["export", "onnx", "--model", str(model), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "no *.safetensors weights" in result.output and "no tokenizer" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.from_numpy on a read-only array, inside the quantizer
def test_split_float_zero_points_is_exact():
    """HQQ's float zero points rewritten as uint4 zero points + a per-block offset give the same outputs."""
    import copy

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from export.onnx import split_float_zero_points

    rng = np.random.default_rng(0)
    k, n = 96, 40  # 3 blocks of 32: an odd count exercises the padding nibble of the packed zero points
    w = rng.normal(size=(k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", n])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q = MatMulNBitsQuantizer(model, algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4))
    q.process()
    hqq = q.model.model
    split = copy.deepcopy(hqq)
    assert split_float_zero_points(split, accuracy_level=None) == 1
    zp = next(i for i in split.graph.initializer if i.name.endswith("_zero_points_u4"))
    assert zp.data_type == TensorProto.UINT8 and tuple(zp.dims) == (n, 2)

    x = rng.normal(size=(1, 7, k)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(split), run(hqq), atol=1e-4)
    assert np.abs(run(split) - x @ w).max() < 0.25 * np.abs(x @ w).max()  # still a 4-bit approximation of w


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.from_numpy on a read-only array, inside the quantizer
@pytest.mark.parametrize("algorithm", ["hqq", "k_quant", "rtn"])
def test_int4_keeps_down_v_and_k_projections_and_logits_at_8_bits(fp32_export, tmp_path, algorithm, smol_tokenizer_dir):
    import onnx

    from export.onnx import OrtLM
    from export.onnx.quantize import Int4Settings, quantize_int4

    out, _ = fp32_export
    settings = quantize_int4(out / "model.onnx", tmp_path / "model.onnx", Int4Settings(algorithm=algorithm))
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    projections = {name: b for name, b in bits.items() if "_offset" not in name}  # HQQ's per-block offsets aside
    higher = {name: b for name, b in projections.items() if any(p in name for p in ("down_proj", "v_proj", "k_proj"))}
    logits = {name: b for name, b in projections.items() if "lm_head" in name}
    rest = {name: b for name, b in projections.items() if name not in higher and name not in logits}
    assert len(higher) == settings["eight_bit_nodes"] == 6 and set(higher.values()) == {8}  # 2 layers x (down, v, k)
    assert set(logits.values()) == {8} and len(rest) == 8 and set(rest.values()) == {4}  # q, o, gate, up per layer
    weights = {i.name for i in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]  # no float projection left
    lm = OrtLM(tmp_path / "model.onnx")
    assert np.isfinite(lm.logits([[1, 2, 3, 4]], 0)[0]).all()


def _nbits_graph(k: int, n: int, readers: dict[str, str], accuracy_level: int, seed: int = 0):
    """A graph of MatMuls (name -> input) on a shared weight shape, quantized by onnxruntime to 8-bit blocks of 32."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(seed)
    inputs = sorted(set(readers.values()))
    nodes, inits = [], []
    for name, x in readers.items():
        inits.append(numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), f"{name}_w"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}_w"], [f"{name}_y"], name=name))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "seq", k]) for x in inputs],
                              [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, "seq", n]) for name in readers],
                              inits)
    q = MatMulNBitsQuantizer(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), bits=8, block_size=32,
                             is_symmetric=True, accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
    q.process()
    return q.model.model


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.from_numpy on a read-only array, inside the quantizer
def test_two_pass_activations_removes_the_int8_kernels_input_rounding():
    """int8 compute rounds each input block to 8 bits; split into that rounding plus its remainder, the same
    node gives the float-activation result on the same 8-bit weights, with one split per shared input."""
    import onnxruntime as ort

    from export.onnx.graph import two_pass_activations

    readers = {"q": "x", "k": "x", "o": "z"}  # q and k read one input: one split serves both
    k, n = 96, 40
    rng = np.random.default_rng(1)
    feeds = {"x": rng.normal(size=(1, 5, k)).astype(np.float32), "z": rng.normal(size=(1, 5, k)).astype(np.float32)}
    feeds["x"][0, 0, 7] = 300.0  # a massive activation: its block's other inputs round to 0 at 8 bits
    feeds["z"][0, 2, 40:72] = 0.0  # an all-zero block must stay finite

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    weights_only = run(_nbits_graph(k, n, readers, accuracy_level=0))  # float activations, the same 8-bit weights
    int8 = _nbits_graph(k, n, readers, accuracy_level=4)
    plain = run(int8)
    assert sorted(two_pass_activations(int8)) == sorted(n.name for n in int8.graph.node if n.op_type == "MatMulNBits")
    assert sum(node.op_type == "Concat" for node in int8.graph.node) == 2  # x once (q, k), z once
    split = run(int8)
    for exact, before, after in zip(weights_only, plain, split):
        assert np.isfinite(after).all()
        err_before, err_after = np.abs(before - exact).max(), np.abs(after - exact).max()
        assert err_after < err_before / 20, (err_before, err_after)


def test_activation_bits_16_int8_export_agrees_better(tiny_llama_dir, int8_export, out_root):
    from export.onnx import export_onnx

    record = export_onnx(tiny_llama_dir, out_root / "int8-a16", quantize="int8", activation_bits=16)
    plain = int8_export[1].metrics
    q = record.metrics["quantizer"]
    assert q["activation_bits"] == 16
    assert q["two_pass_nodes"] == 15  # 2 layers x 7 projections + the logits projection
    assert record.metrics["size_bytes"] - plain["size_bytes"] < 0.01 * plain["size_bytes"]  # the same weights
    # the random tiny model is too unsure for int8's top-1 bar either way; its KL must fall, with and without cache
    assert record.metrics["logits"]["mean_kl"] < 0.75 * plain["logits"]["mean_kl"]
    assert record.metrics["kv_cache"]["mean_kl"] < 0.75 * plain["kv_cache"]["mean_kl"]


@pytest.mark.parametrize("args, message", [
    (["--activation-bits", "16"], "--activation-bits 16: only int8 and int4"),
    (["--activation-bits", "16", "--quantize", "fp16"], "--activation-bits 16: only int8 and int4"),
    (["--activation-bits", "12", "--quantize", "int8"], "'12' is not one of '8', '16'"),
])
def test_activation_bits_refused_in_one_line(tiny_llama_dir, tmp_path, args, message):
    result = _cli(["export", "onnx", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "out"), *args])
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
