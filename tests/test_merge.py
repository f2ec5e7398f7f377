"""edgeft merge: merged equals unmerged, nf4-dequant reproduces QLoRA training, clean failures.

Adapters are built with peft (``conftest.make_adapter``) on tiny llama models (hidden 64: a multiple
of bitsandbytes' blocksize), one on a 16-bit base and one on a real bitsandbytes 4-bit base.
``init_lora_weights=False`` leaves B random, so the adapters move the outputs and a missing merge
would show.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZER_FILES, bnb_config, make_adapter
from edgeft.core.errors import EdgeftError

MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "edgeft-merge.json", "edgeft-verify.json"}


def model_logits(model, tokenizer_dir: Path) -> torch.Tensor:
    """(T, V) logits of one chat-formatted prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                  return_tensors="pt")
    with torch.inference_mode():
        return model.eval()(input_ids=ids).logits[0]


def invoke(*args: object):
    from click.testing import CliRunner

    from edgeft.cli import cli

    return CliRunner().invoke(cli, ["merge", *map(str, args)])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a CPU shared with other jobs, two torch threads wait on each other (several times slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory, tiny_llama_dir) -> Path:
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("qlora") / "adapter", qlora=True, seed=1)


@pytest.fixture(scope="module")
def lora_merged(tmp_path_factory, tiny_lora_adapter):
    from edgeft.merge import merge_adapter

    out = tmp_path_factory.mktemp("lora_out") / "merged"
    return out, merge_adapter(tiny_lora_adapter, out)


@pytest.fixture(scope="module")
def qlora_merged(tmp_path_factory, qlora_adapter):
    from edgeft.merge import merge_adapter

    out = tmp_path_factory.mktemp("qlora_out") / "merged"
    return out, merge_adapter(qlora_adapter, out)


def test_lora_merged_equals_unmerged(lora_merged, tiny_lora_adapter, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, record = lora_merged
    assert record.status == "passed", record.summary()
    assert record.metrics["policy"] == "base"  # auto, 16-bit training
    assert {p.name for p in out.iterdir()} == MODEL_FILES

    merged = AutoModelForCausalLM.from_pretrained(out)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(tiny_lora_adapter))
    bare = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    want = model_logits(unmerged, tiny_llama_dir)
    torch.testing.assert_close(model_logits(merged, tiny_llama_dir), want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model_logits(bare, tiny_llama_dir), want, atol=1e-2)  # the adapter matters

    on_disk = json.loads((out / "edgeft-verify.json").read_text())
    assert (on_disk["status"], on_disk["kind"], on_disk["reference"]) == ("passed", "merged", str(tiny_lora_adapter))
    assert {c["name"] for c in on_disk["checks"]} >= {"finite", "top1_agreement", "mean_kl"}
    provenance = json.loads((out / "edgeft-merge.json").read_text())
    assert (provenance["policy"], provenance["dtype"], provenance["adapter"]) == ("base", "fp32", str(tiny_lora_adapter))
    assert provenance["base"] == str(tiny_llama_dir) and provenance["method"] == "lora"
    assert provenance["training_run"] == json.loads((tiny_lora_adapter / "edgeft-run.json").read_text())


def test_qlora_nf4_dequant_reproduces_training(qlora_merged):
    out, record = qlora_merged
    assert record.status == "passed", record.summary()
    assert record.metrics["policy"] == "nf4-dequant"  # auto, 4-bit training
    assert record.metrics["quantized_layers"] == 2 * 7  # every Linear of 2 llama layers; not lm_head
    nf4, base = record.metrics["policies"]["nf4-dequant"], record.metrics["policies"]["base"]
    assert nf4["top1_agreement"] >= 0.99 and nf4["mean_kl"] < 1e-6
    assert nf4["mean_kl"] < base["mean_kl"] / 100
    assert {p.name for p in out.iterdir()} == MODEL_FILES


def test_round_trip_is_what_bitsandbytes_holds(tiny_llama_dir):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    from edgeft.merge import Quantization, quantize_dequantize

    q4 = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, quantization_config=bnb_config())
    fp32 = dict(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).named_modules())
    quant = Quantization(quant_type="nf4", double_quant=True, compute_dtype="float32", load_dtype="float32")
    layers = {n: m for n, m in q4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert "lm_head" not in layers and len(layers) == 14
    for name, layer in layers.items():
        held = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(quantize_dequantize(fp32[name].weight, quant), held), name


def test_rerun_refused_and_overwrite_is_byte_identical(tmp_path, tiny_lora_adapter):
    from safetensors import safe_open

    from edgeft.merge import merge_adapter

    out = tmp_path / "merged"
    first = merge_adapter(tiny_lora_adapter, out, dtype="fp16")
    assert first.status == "passed", first.summary()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(EdgeftError, match="--output"):
        merge_adapter(tiny_lora_adapter, out, dtype="fp16")
    merge_adapter(tiny_lora_adapter, out, dtype="fp16", overwrite=True)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys() == MODEL_FILES
    for name in MODEL_FILES - {"edgeft-verify.json"}:
        assert after[name] == before[name], name
    records = [json.loads(d["edgeft-verify.json"]) for d in (before, after)]
    for r in records:
        r.pop("created")
    assert records[0] == records[1]
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("arch, hidden, message", [("llama", 128, "does not fit"), ("qwen2", 64, "trained on a llama model")])
def test_cli_adapter_for_another_base(tmp_path, tiny_lora_adapter, smol_tokenizer_dir, arch, hidden, message):
    from conftest import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", smol_tokenizer_dir, hidden=hidden, arch=arch)
    result = invoke("--adapter", tiny_lora_adapter, "--output", tmp_path / "out", "--base", other)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("edgeft: error:") and message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_truncated_adapter(tmp_path, tiny_lora_adapter):
    broken = shutil.copytree(tiny_lora_adapter, tmp_path / "adapter")
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    result = invoke("--adapter", broken, "--output", tmp_path / "out")
    assert result.exit_code == 1
    assert "truncated" in result.stderr and "adapter_model.safetensors" in result.stderr
    assert "Traceback" not in result.output


def test_cli_missing_adapter(tmp_path):
    result = invoke("--adapter", tmp_path / "nope", "--output", tmp_path / "out")
    assert result.exit_code == 1 and "--adapter" in result.stderr and "not found" in result.stderr


def test_cli_nonfinite_weights_fail_verification(tmp_path, tiny_lora_adapter):
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(tiny_lora_adapter, tmp_path / "adapter")
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")

    result = invoke("--adapter", bad, "--output", tmp_path / "out")
    assert result.exit_code == 3, result.output
    record = json.loads((tmp_path / "out" / "edgeft-verify.json").read_text())
    assert record["status"] == "failed"
    assert [c["passed"] for c in record["checks"] if c["name"] == "finite"] == [False]
    assert record["metrics"]["nonfinite_tensors"]
    assert not (tmp_path / "out" / "model.safetensors").exists()  # never written


def test_missing_tokenizer(tmp_path, tiny_lora_adapter, tiny_llama_dir):
    from edgeft.merge import merge_adapter

    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, base / name)
    adapter = shutil.copytree(tiny_lora_adapter, tmp_path / "adapter")
    for name in TOKENIZER_FILES:
        (adapter / name).unlink()
    with pytest.raises(EdgeftError, match="tokenizer"):
        merge_adapter(adapter, tmp_path / "out", base=str(base))


@pytest.mark.parametrize("run_update, policy, message", [
    ({}, "nf4-dequant", "--policy nf4-dequant"),  # a 16-bit-trained adapter has no 4-bit round trip
    ({"status": "running"}, "auto", "training has not completed"),
])
def test_refused_before_loading_weights(tmp_path, tiny_lora_adapter, run_update, policy, message):
    from edgeft.merge import merge_adapter

    adapter = shutil.copytree(tiny_lora_adapter, tmp_path / "adapter")
    run = json.loads((adapter / "edgeft-run.json").read_text()) | run_update
    (adapter / "edgeft-run.json").write_text(json.dumps(run))
    with pytest.raises(EdgeftError, match=message):
        merge_adapter(adapter, tmp_path / "out", policy=policy)
    assert not (tmp_path / "out").exists()


def test_foreign_adapter_states_assumed_quantization(tmp_path, qlora_adapter):
    from edgeft.merge import merge_adapter

    foreign = shutil.copytree(qlora_adapter, tmp_path / "adapter")
    (foreign / "edgeft-run.json").unlink()  # base comes from adapter_config.json now
    record = merge_adapter(foreign, tmp_path / "out", policy="nf4-dequant")
    assert record.status == "passed", record.summary()
    assert record.metrics["quantization_assumed"] is True and "assumed" in record.metrics["assumption"]
    provenance = json.loads((tmp_path / "out" / "edgeft-merge.json").read_text())
    assert provenance["quantization"]["assumed"] is True and provenance["training_run"] is None


def test_qlora_base_policy_is_held_to_the_quantization_gap(tmp_path, qlora_adapter):
    from edgeft.merge import GAP_KL_FACTOR, merge_adapter

    record = merge_adapter(qlora_adapter, tmp_path / "out", policy="base")
    assert record.status == "passed", record.summary()
    gap, base = record.metrics["quantization_gap"], record.metrics["policies"]["base"]
    assert gap["mean_kl"] > 0.01 and base["mean_kl"] > 0.01  # the tiny model's NF4 error is large
    bars = {c.name: c.threshold for c in record.checks}
    assert bars["mean_kl"] == pytest.approx(GAP_KL_FACTOR * gap["mean_kl"], rel=1e-3)
    assert bars["merge_mean_kl"] <= 1e-3  # the merge itself is still exact
