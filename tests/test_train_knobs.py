"""Training knobs: the exponential and step schedules' learning-rate sequences, layer-wise rates
(larger toward the output) and LoRA+ rates per parameter group, and their validation."""

from __future__ import annotations

import pytest

from edgeft.config import TrainConfig, validate
from edgeft.core.errors import ConfigError
from edgeft.train.optim import build_optimizer, build_scheduler


def lr_sequence(steps: int, **options) -> list[float]:
    """The rate after each of ``steps`` scheduler steps (the first value is before any step)."""
    import torch

    cfg = TrainConfig(lr=1.0, optimizer="adamw", warmup_ratio=0.0, **options)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(cfg, opt, steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_exponential_schedule():
    assert lr_sequence(6, lr_scheduler="exponential", lr_gamma=0.5, warmup_steps=2) == pytest.approx(
        [0.0, 0.5, 1.0, 0.5, 0.25, 0.125])
    # Default gamma: the rate falls to 10% of the peak by the last step (10 decay steps).
    seq = lr_sequence(11, lr_scheduler="exponential")
    assert seq[0] == 1.0 and seq[-1] == pytest.approx(0.1) and seq[5] == pytest.approx(0.1 ** 0.5)


def test_step_schedules():
    assert lr_sequence(6, lr_scheduler="step", lr_milestones="3,5", lr_gamma=0.1, warmup_steps=1) == pytest.approx(
        [0.0, 1.0, 1.0, 0.1, 0.1, 0.01])
    assert lr_sequence(5, lr_scheduler="step", lr_step_size=2, lr_gamma=0.5) == pytest.approx([1, 1, 0.5, 0.5, 0.25])
    # Default: x0.1 at 50% and 75% of the steps.
    assert lr_sequence(8, lr_scheduler="step") == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def tiny_llama(layers: int = 4):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))


def rates_by_name(model, cfg: TrainConfig) -> dict[str, float]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(cfg, [p for _, p in named], [n for n, _ in named])
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {n: rate[id(p)] for n, p in named}


def test_layer_wise_and_loraplus_rates_per_lora_group():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    cfg = TrainConfig(lr=1e-3, optimizer="adamw", layer_lr_decay=0.5, loraplus_lr_ratio=4.0)
    rates = rates_by_name(model, cfg)
    assert len(rates) == 4 * 2 * 2  # 4 blocks x 2 layers x (A, B)
    for name, rate in rates.items():
        block = int(name.split(".layers.")[1].split(".")[0])
        expected = 1e-3 * 0.5 ** (3 - block) * (4.0 if "lora_B" in name else 1.0)
        assert rate == pytest.approx(expected), name
    # Off by default: one rate for every group, as before.
    assert set(rates_by_name(model, TrainConfig(lr=1e-3, optimizer="adamw")).values()) == {1e-3}


def test_layer_wise_rates_of_a_full_model():
    model = tiny_llama(layers=3)
    rates = rates_by_name(model, TrainConfig(lr=1.0, optimizer="adamw", layer_lr_decay=0.8, weight_decay=0.1))
    assert rates["model.embed_tokens.weight"] == pytest.approx(0.8 ** 3)
    assert rates["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0.8 ** 2)
    assert rates["model.layers.1.input_layernorm.weight"] == pytest.approx(0.8)
    assert rates["model.layers.2.mlp.up_proj.weight"] == 1.0
    assert rates["model.norm.weight"] == 1.0 and rates["lm_head.weight"] == 1.0


def test_knob_validation_names_each_flag(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg = TrainConfig(data=str(data), output=str(tmp_path / "o"), lr_gamma=1.5, lr_milestones="5,3",
                      layer_lr_decay=0.0, loraplus_lr_ratio=-1.0)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    for flag in ("--lr-gamma", "--lr-milestones", "--layer-lr-decay", "--loraplus-lr-ratio"):
        assert flag in e.value.message
