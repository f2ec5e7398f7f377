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


def _task_examples(sizes: dict[str, int]):
    from edgeft.data import Tokenized

    tasks = [task for task, n in sizes.items() for _ in range(n)]
    return [Tokenized([1] * (3 + i % 5), [1] * (3 + i % 5), i + 1, task) for i, task in enumerate(tasks)]


def test_task_weights_give_each_task_its_share_of_an_epoch(tmp_path):
    from collections import Counter

    from edgeft.train.batches import plan_batches

    examples = _task_examples({"sentiment": 30, "topic": 90})
    cfg = TrainConfig(data=str(tmp_path / "d.jsonl"), batch_size=4, seed=3, task_weights="sentiment=2,topic=1")
    batches, _ = plan_batches(cfg, examples)

    def seen(epoch: int, b=batches) -> Counter:
        return Counter(i for batch in b.epoch_order(epoch) for i in batch)

    for epoch in range(3):
        rows = seen(epoch)
        per_task = Counter(examples[i].task for i in rows.elements())
        # 120 rows per epoch; sentiment fills 120 x 30*2 / (30*2 + 90*1) = 48 of them, topic 72.
        assert per_task == {"sentiment": 48, "topic": 72}
        # Each sentiment row is seen 1.6 times per epoch, each topic row 0.8 times: twice as often.
        assert {rows[i] for i in range(30)} == {1, 2} and {rows[i] for i in range(30, 120)} <= {0, 1}
    # Over five epochs every topic row comes round, and the per-row rates keep their 2:1 ratio.
    total = sum((seen(e) for e in range(5)), Counter())
    assert sum(total[i] for i in range(30)) / 30 == pytest.approx(2 * sum(total[i] for i in range(30, 120)) / 90)
    assert batches.epoch_order(1) == plan_batches(cfg, examples)[0].epoch_order(1)  # the seed decides the order
    other = TrainConfig(data=cfg.data, batch_size=4, seed=4, task_weights=cfg.task_weights)
    assert plan_batches(other, examples)[0].epoch_order(1) != batches.epoch_order(1)
    # Without weights an epoch is a permutation: every row once, the natural 1:3 proportion.
    plain, _ = plan_batches(TrainConfig(data=cfg.data, batch_size=4, seed=3), examples)
    assert sorted(seen(0, plain)) == list(range(120)) and set(seen(0, plain).values()) == {1}


def test_task_weights_errors_name_the_flag_or_field(tmp_path):
    from edgeft.cli import cli
    from click.testing import CliRunner

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b", "task": "sentiment"}\n'
                    '{"prompt": "c", "completion": "d", "task": "topic"}\n')
    untagged = tmp_path / "u.jsonl"
    untagged.write_text('{"prompt": "a", "completion": "b", "task": "sentiment"}\n{"prompt": "c", "completion": "d"}\n')

    def train(*args) -> tuple[int, str]:
        r = CliRunner().invoke(cli, ["train", "--output", str(tmp_path / "o"), "--overwrite", *map(str, args)])
        lines = [ln for ln in r.output.splitlines() if ln.startswith("edgeft: error:")]
        assert len(lines) == 1, r.output
        return r.exit_code, lines[0]

    for weights, message in (("sentiment=2,topic", "'topic' is not task=weight"),
                             ("sentiment=0", "weight of task 'sentiment' must be a number > 0, got 0"),
                             ("sentiment=1,topic=x", "'topic=x' is not task=weight")):
        code, line = train("--data", data, "--task-weights", weights)
        assert code == 2 and line.startswith(f"edgeft: error: --task-weights: {message}"), line
    code, line = train("--data", data, "--task-weights", "sentiment=2", "--packing")
    assert code == 2 and "--task-weights does not work with --packing" in line
    code, line = train("--data", data, "--task-weights", "sentiment=2,news=1")
    assert code == 1 and "--task-weights names task(s) news with no rows in" in line
    code, line = train("--data", untagged, "--task-weights", "sentiment=2")
    assert code == 1 and "u.jsonl:2: missing field 'task' (--task-weights" in line
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "task": 3}\n')
    code, line = train("--data", bad)
    assert code == 1 and "b.jsonl:1: field 'task' must be a non-empty string" in line


def test_task_weights_recorded_in_the_run_record(tmp_path, tiny_llama_dir):
    import json

    from click.testing import CliRunner

    from edgeft.cli import cli

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Item {i}?", "output": "red", "task": ["a", "b", "b"][i % 3]})
                            + "\n" for i in range(12)))
    config = tmp_path / "c.yaml"
    config.write_text("task_weights: {a: 3}\n")  # the YAML mapping form; task b weighs 1
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--config", str(config), "--model", str(tiny_llama_dir), "--data", str(data),
                                 "--output", str(out), "--method", "lora", "--max-steps", "1", "--batch-size", "4",
                                 "--max-seq-len", "64", "--eval-split", "0", "--optimizer", "adamw"])
    assert r.exit_code == 0, r.output
    record = json.loads((out / "edgeft-run.json").read_text())
    assert record["config"]["task_weights"] == "a=3"
    # 12 rows: a has 4 (weight 3), b has 8 (weight 1); a fills 12 x 12 / 20 = 7.2 -> 7 rows of each epoch.
    assert record["data"]["tasks"] == {"weighted": True, "tasks": {
        "a": {"rows": 4, "weight": 3.0, "rows_per_epoch": 7}, "b": {"rows": 8, "weight": 1.0, "rows_per_epoch": 5}}}
