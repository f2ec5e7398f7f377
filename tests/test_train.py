"""Training on a tiny model: real bitsandbytes 4-bit, real peft, real CLI."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from edgeft.cli import cli

def run_train(*args: str):
    result = CliRunner().invoke(cli, ["train", *args], catch_exceptions=False)
    return result


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


COMMON = ["--batch-size", "4", "--max-seq-len", "64", "--lr", "5e-3", "--lora-r", "8", "--eval-split", "0.1",
          "--warmup-steps", "0", "--seed", "7"]


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_loss_goes_down_and_adapter_reloads(tmp_path, tiny_llama_dir, task_file, method):
    out = tmp_path / method
    r = run_train("--model", str(tiny_llama_dir), "--data", str(task_file), "--output", str(out), "--method", method,
                  "--max-steps", "24", "--eval-every", "12", "--lr-scheduler", "constant", *COMMON)
    assert r.exit_code == 0, r.output
    m = [x for x in metrics(out) if "loss" in x]
    first, last = sum(x["loss"] for x in m[:3]) / 3, sum(x["loss"] for x in m[-3:]) / 3
    assert last < 0.7 * first, (first, last)  # random tiny model: 11 -> ~6.6 measured
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "edgeft-run.json",
            "metrics.jsonl", "curves.png"} <= files
    record = json.loads((out / "edgeft-run.json").read_text())
    assert record["status"] == "completed" and record["steps"] == 24 and record["method"] == method
    assert (record["quantization"] is not None) == (method == "qlora")

    # The saved adapter reproduces the recorded eval loss when reloaded with the standard PEFT API.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if method == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, **kw)
    model = PeftModel.from_pretrained(base, out)
    from edgeft.config import TrainConfig
    from edgeft.train import _prepare, evaluate

    cfg = TrainConfig(model=str(tiny_llama_dir), data=str(task_file), output=str(out), method=method, batch_size=4,
                      max_seq_len=64, eval_split=0.1, seed=7)
    *_, tok, _, eval_ex, _, _ = _prepare(cfg)
    loss = evaluate(model, [[e] for e in eval_ex], cfg, tok.pad_token_id, "cpu", selective=True)
    assert loss == pytest.approx(record["final_metrics"]["eval_loss"], rel=1e-3)


def test_selective_loss_equals_full_forward_loss(tiny_llama_dir, task_file):
    """The response-only output projection gives the same loss as the model's own forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.config import TrainConfig
    from edgeft.train import _prepare, collate, loss_sum

    cfg = TrainConfig(model=str(tiny_llama_dir), data=str(task_file), output="unused", method="lora", max_seq_len=64)
    *_, tok, train_ex, _, _, _ = _prepare(cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    batch = collate([[e] for e in train_ex[:4]], tok.pad_token_id, "cpu", need_mask=False)
    s_sel, n_sel = loss_sum(model, batch, selective=True)
    ref = model(input_ids=batch["input_ids"], labels=batch["labels"])  # HF mean over target tokens
    assert n_sel > 0
    assert float(s_sel) / n_sel == pytest.approx(float(ref.loss), rel=1e-5)


def test_resume_continues_exactly(tmp_path, tiny_llama_dir, task_file):
    args = ["--model", str(tiny_llama_dir), "--data", str(task_file), "--method", "lora", "--max-steps", "8",
            "--save-every", "4", "--eval-every", "0", *COMMON]
    full = tmp_path / "full"
    assert run_train(*args, "--output", str(full)).exit_code == 0
    assert (full / "checkpoints" / "step-0000004" / "state.json").is_file()
    # Simulate a run that died after its step-4 checkpoint: keep only what existed then.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoints", part / "checkpoints")
    (part / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in metrics(full) if x["step"] <= 6))
    r = run_train(*args, "--output", str(part), "--resume")
    assert r.exit_code == 0, r.output
    assert [x["step"] for x in metrics(part) if "loss" in x] == list(range(1, 9))
    losses = lambda out: [x["loss"] for x in metrics(out) if "loss" in x]  # noqa: E731
    assert losses(part)[4:] == pytest.approx(losses(full)[4:], rel=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(full / "adapter_model.safetensors"), load_file(part / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k


def test_full_and_prompt_methods_train(tmp_path, tiny_llama_dir, task_file):
    for method in ("full", "prompt-tuning", "prefix-tuning", "p-tuning"):
        out = tmp_path / method
        r = run_train("--model", str(tiny_llama_dir), "--data", str(task_file), "--output", str(out), "--method", method,
                      "--max-steps", "3", "--optimizer", "adamw", "--batch-size", "4", "--max-seq-len", "64",
                      "--num-virtual-tokens", "4")
        assert r.exit_code == 0, (method, r.output)
        m = [x for x in metrics(out) if "loss" in x]
        assert len(m) == 3 and all(x["loss"] > 0 for x in m)
    assert (tmp_path / "full" / "model.safetensors").is_file()
    assert (tmp_path / "prompt-tuning" / "adapter_config.json").is_file()


def test_packing_and_grad_accum(tmp_path, tiny_llama_dir, task_file):
    out = tmp_path / "packed"
    r = run_train("--model", str(tiny_llama_dir), "--data", str(task_file), "--output", str(out), "--method", "lora",
                  "--max-steps", "3", "--packing", "--grad-accum", "2", "--batch-size", "2", "--max-seq-len", "128")
    assert r.exit_code == 0, r.output
    assert len([x for x in metrics(out) if "loss" in x]) == 3


def test_early_stopping(tmp_path, tiny_llama_dir, task_file):
    out = tmp_path / "early"
    r = run_train("--model", str(tiny_llama_dir), "--data", str(task_file), "--output", str(out), "--method", "lora",
                  "--max-steps", "60", "--eval-every", "1", "--early-stopping-patience", "2", "--lr", "0.5",
                  "--batch-size", "4", "--max-seq-len", "64", "--optimizer", "adamw")
    assert r.exit_code == 0, r.output
    record = json.loads((out / "edgeft-run.json").read_text())
    assert record["stopped_early"] is True and record["steps"] < 60


def test_qlora_cpu_memory_policies_keep_outputs_identical(tiny_llama_dir):
    """The weight file is unmapped after 4-bit loading and 4-bit layers dequantize straight into
    bf16, and the model computes bit for bit what the unmodified bitsandbytes model computes."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from edgeft.config import TrainConfig
    from runtime.modelfiles import load_tokenizer
    from edgeft.train import load_model

    cfg = TrainConfig(model=str(tiny_llama_dir), data="unused.jsonl", output="unused", method="qlora",
                      compute_dtype="bfloat16")
    tok = load_tokenizer(str(tiny_llama_dir))
    model = load_model(cfg, str(tiny_llama_dir), "cpu", torch.bfloat16, tok)
    weights = str((tiny_llama_dir / "model.safetensors").resolve())
    maps = open("/proc/self/maps").read()
    assert weights not in maps  # no parameter still views the memory-mapped file
    states = [m.weight.quant_state for m in model.modules() if getattr(getattr(m, "weight", None), "quant_state", None)]
    assert states and all(s.dtype == torch.bfloat16 for s in states)

    plain = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    plain.train()  # train mode on both: bitsandbytes repacks weights for inference in eval mode
    model.train()
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        ours = model(input_ids=ids, use_cache=False).logits
        ref = plain(input_ids=ids, use_cache=False).logits
    assert torch.equal(ours, ref)  # LoRA B starts at zero: the adapter adds exactly nothing


def test_pickle_only_model_refused_unless_allowed(tmp_path, tiny_llama_dir, task_file):
    """A model stored only as pickle weights is refused with one line naming --allow-pickle, and
    trains with the flag (transformers reads .bin with torch.load(weights_only=True))."""
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(pickled, safe_serialization=False)
    shutil.copy(tiny_llama_dir / "tokenizer.json", pickled / "tokenizer.json")
    shutil.copy(tiny_llama_dir / "tokenizer_config.json", pickled / "tokenizer_config.json")
    assert (pickled / "pytorch_model.bin").is_file() and not list(pickled.glob("*.safetensors"))
    args = ["--model", str(pickled), "--data", str(task_file), "--method", "lora", "--max-steps", "2", *COMMON]
    r = CliRunner().invoke(cli, ["train", *args, "--output", str(tmp_path / "refused")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "only pickle weights" in lines[0] and "--allow-pickle" in lines[0], r.output
    assert not (tmp_path / "refused" / "adapter_model.safetensors").exists()
    r = run_train(*args, "--output", str(tmp_path / "allowed"), "--allow-pickle")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "allowed" / "adapter_model.safetensors").is_file()
