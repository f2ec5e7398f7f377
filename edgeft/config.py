"""Typed training configuration.

One dataclass holds every knob; each field's ``help`` metadata becomes the CLI flag's help
and the comment in the shipped YAML examples. Precedence: flag > YAML (``--config``) >
default. ``validate`` collects every problem and raises once, before any weights load.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from edgeft.core.errors import ConfigError

METHODS = ("qlora", "lora", "full", "prompt-tuning", "prefix-tuning", "p-tuning")
PEFT_PROMPT_METHODS = ("prompt-tuning", "prefix-tuning", "p-tuning")
SCHEMAS = ("auto", "instruction", "chat", "sharegpt", "prompt-completion", "text")
SCHEDULERS = ("constant", "linear", "cosine", "exponential", "step")
OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw", "adamw_8bit")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
SHARDINGS = ("ddp", "fsdp")
FSDP_METHODS = ("lora", "qlora", "full")


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, cli: bool = True):
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


@dataclass
class TrainConfig:
    # What to train on
    model: str | None = _f(None, "model: local HF directory, .gguf file or Hub id (default: embedded SmolLM2-135M-Instruct)")
    data: str | None = _f(None, "training data: .jsonl, .json, .csv or .tsv")
    eval_data: str | None = _f(None, "held-out data file (default: split --eval-split off the training data)")
    output: str | None = _f(None, "output directory (adapter, tokenizer, run record, metrics, curves)")
    split_by: str | None = _f(None, "train one adapter per distinct value of this data field (e.g. task), one after "
                                    "the other, each into OUTPUT/<value>/; --eval-data rows are split the same way")
    schema: str = _f("auto", "data schema; auto detects it from the first row's keys", SCHEMAS)
    method: str = _f("qlora", "fine-tuning method", METHODS)
    # Sequence handling
    max_seq_len: int = _f(512, "longest sequence in tokens; longer rows are truncated (and counted)")
    packing: bool = _f(False, "pack several rows into one sequence (attention stays within each row)")
    # Optimisation
    epochs: float = _f(1.0, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = _f(None, "optimizer steps to run (overrides --epochs)")
    batch_size: int = _f(4, "rows per micro-batch; lower it to save memory")
    grad_accum: int = _f(1, "micro-batches per optimizer step (effective batch = batch_size x grad_accum)")
    lr: float = _f(2e-4, "peak learning rate")
    lr_scheduler: str = _f("cosine", "learning-rate schedule after warm-up", SCHEDULERS)
    warmup_steps: int = _f(0, "linear warm-up steps (overrides --warmup-ratio when > 0)")
    warmup_ratio: float = _f(0.03, "warm-up as a fraction of all steps")
    lr_gamma: float | None = _f(None, "decay factor: per step for exponential (default: the rate falls to 10% of --lr "
                                      "by the last step), per milestone for step (default 0.1)")
    lr_step_size: int = _f(0, "step schedule: multiply the rate by --lr-gamma every N steps after warm-up "
                              "(0: use --lr-milestones)")
    lr_milestones: str = _f("", "step schedule: comma-separated steps at which the rate is multiplied by "
                                "--lr-gamma (default: 50% and 75% of the steps)")
    layer_lr_decay: float = _f(1.0, "layer-wise rate: decoder block i of L trains at --lr x decay^(L-1-i), larger "
                                    "toward the output; embeddings at decay^L (1: off)")
    loraplus_lr_ratio: float = _f(1.0, "LoRA+: LoRA B matrices train at this multiple of their group's rate "
                                       "(1: off; the LoRA+ paper suggests 16)")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 turns clipping off")
    optimizer: str = _f("paged_adamw_8bit", "optimizer (paged ones page state to CPU under memory pressure)", OPTIMIZERS)
    seed: int = _f(42, "seed for initialisation, data order and dropout")
    task_weights: str = _f("", "per-task sampling weights for rows with a 'task' field, e.g. sentiment=2,topic=1: "
                               "an epoch keeps its length and task t fills the share rows_t x w_t / sum(rows x w) "
                               "of it (unnamed tasks weigh 1)")
    # Evaluation, early stopping, checkpoints
    eval_split: float = _f(0.05, "fraction of training rows held out for evaluation when no --eval-data")
    eval_every: int = _f(50, "evaluate every N optimizer steps (0: only at the end)")
    early_stopping_patience: int = _f(0, "stop after N evaluations without improvement (0: off)")
    save_every: int = _f(100, "write a checkpoint every N optimizer steps (0: off)")
    keep_checkpoints: int = _f(2, "checkpoints kept; the last good one survives while a new one is written")
    log_every: int = _f(1, "write a metrics line every N steps")
    # Adapter
    lora_r: int = _f(16, "LoRA rank; higher increases capacity and memory")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input (0 skips the mask: about 16% of a CPU step)")
    target_modules: str = _f("all-linear", "layers LoRA adapts: all-linear, attention, mlp (named per "
                                           "architecture) or comma-separated layer names")
    num_virtual_tokens: int = _f(20, "virtual tokens for prompt/prefix/p-tuning")
    # Quantization and memory
    quant_type: str = _f("nf4", "4-bit data type for --method qlora", QUANT_TYPES)
    double_quant: bool = _f(True, "quantize the 4-bit scales too (saves about 0.4 bit per weight)")
    compute_dtype: str = _f("auto", "matmul dtype: auto = bf16 on GPUs and CPUs with bf16 instructions, else fp16 (GPU) / fp32 (CPU)", COMPUTE_DTYPES)
    gradient_checkpointing: bool = _f(True, "recompute activations in backward to save memory")
    device: str = _f("auto", "where to train", DEVICES)
    threads: int | None = _f(None, "CPU threads for torch (default: torch's choice)")
    # Several processes (data parallel)
    num_processes: int = _f(1, "processes that train together on this machine, each on its share of every batch "
                               "(launches torchrun; global batch = batch_size x grad_accum x processes x nnodes)")
    dist_timeout: int = _f(300, "seconds a process of a multi-process run waits for the others before the run "
                                "stops with an error")
    sharding: str = _f("ddp", "how several processes share the model: ddp keeps a whole copy on each; fsdp shards "
                              "weights, gradients and optimizer state over them (lora, qlora, full; needs --optimizer "
                              "adamw)", SHARDINGS)
    nnodes: int = _f(1, "machines of a multi-node run; each runs the same command with its own --node-rank")
    node_rank: int = _f(0, "this machine's number in a multi-node run, 0 .. nnodes-1 (node 0 writes the output)")
    master_addr: str | None = _f(None, "address of node 0, where the nodes of a multi-node run meet (needed when "
                                       "--nnodes > 1)")
    master_port: int = _f(29500, "TCP port on --master-addr for the multi-node rendezvous")
    # Safety
    trust_remote_code: bool = _f(False, "allow model code from the model directory/Hub to run")
    allow_pickle: bool = _f(False, "load a model stored only as pickle weights (*.bin), with torch.load(weights_only=True)")
    skip_bad_rows: bool = _f(False, "train on the good rows and report the bad ones instead of stopping")


def _base_type(tp: Any) -> tuple[type, bool]:
    """(underlying type, optional) for annotations like ``int | None``."""
    if get_origin(tp) in (Union, getattr(__import__("types"), "UnionType", Union)):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


_HINTS = get_type_hints(TrainConfig)


def field_specs() -> list[tuple[dataclasses.Field, type, bool]]:
    return [(f, *_base_type(_HINTS[f.name])) for f in dataclasses.fields(TrainConfig)]


def coerce(name: str, value: Any, where: str) -> Any:
    """Check and convert one value to the field's type; raise ConfigError naming it."""
    spec = {f.name: (f, t, opt) for f, t, opt in field_specs()}
    if name not in spec:
        raise ConfigError(f"{where}: unknown key '{name}'")
    f, tp, optional = spec[name]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: '{name}' must not be empty")
    ok = True
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 as a string
            try:
                value = float(value)
            except ValueError:
                ok = False
        ok = ok and isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = math.isfinite(value)
    elif tp is str:
        if name == "task_weights" and isinstance(value, dict):  # YAML mapping {task: weight}
            value = ",".join(f"{task}={weight}" for task, weight in value.items())
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: '{name}' must be {tp.__name__}, got {type(value).__name__} {value!r}"[:300])
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: '{name}' must be one of {', '.join(choices)}, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config (safely) into a dict of checked values; keys may use - or _."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of option: value")
    out: dict[str, Any] = {}
    problems = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        try:
            out[name] = coerce(name, value, str(path))
        except ConfigError as e:
            problems.append(e.message)
    if problems:
        raise ConfigError("; ".join(problems))
    return out


def validate(cfg: TrainConfig) -> None:
    """Check cross-field rules; report every problem at once."""
    p: list[str] = []
    if not cfg.data:
        p.append("--data is required")
    if not cfg.output:
        p.append("--output is required")
    for name in ("max_seq_len", "batch_size", "grad_accum", "lora_r", "lora_alpha", "num_virtual_tokens", "keep_checkpoints", "log_every"):
        if getattr(cfg, name) < 1:
            p.append(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("eval_every", "save_every", "early_stopping_patience", "warmup_steps"):
        if getattr(cfg, name) < 0:
            p.append(f"--{name.replace('_', '-')} must be >= 0")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        p.append("--max-steps must be >= 1")
    if cfg.epochs <= 0:
        p.append("--epochs must be > 0")
    if cfg.lr <= 0:
        p.append("--lr must be > 0")
    if not 0 <= cfg.eval_split < 1:
        p.append("--eval-split must be in [0, 1)")
    if not 0 <= cfg.warmup_ratio < 1:
        p.append("--warmup-ratio must be in [0, 1)")
    if not 0 <= cfg.lora_dropout < 1:
        p.append("--lora-dropout must be in [0, 1)")
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        p.append("--weight-decay and --max-grad-norm must be >= 0")
    if cfg.threads is not None and cfg.threads < 1:
        p.append("--threads must be >= 1")
    if cfg.num_processes < 1 or cfg.dist_timeout < 1:
        p.append("--num-processes and --dist-timeout must be >= 1")
    p += schedule_problems(cfg) + distributed_problems(cfg) + task_weight_problems(cfg)
    if cfg.early_stopping_patience and cfg.eval_every == 0:
        p.append("--early-stopping-patience needs --eval-every > 0")
    if cfg.method in PEFT_PROMPT_METHODS and cfg.packing:
        p.append(f"--packing is not supported with --method {cfg.method} (virtual tokens are per sequence)")
    if cfg.data and not Path(cfg.data).is_file():
        p.append(f"--data {cfg.data}: file not found")
    if cfg.eval_data and not Path(cfg.eval_data).is_file():
        p.append(f"--eval-data {cfg.eval_data}: file not found")
    if cfg.split_by is not None and not cfg.split_by.strip():
        p.append("--split-by must name a field of the data rows (e.g. task)")
    if cfg.split_by and cfg.task_weights:
        p.append("--split-by trains one adapter per task; --task-weights mixes tasks in one adapter (use one of them)")
    if p:
        raise ConfigError("; ".join(p))


def parse_milestones(text: str) -> list[int]:
    """``"100,200"`` -> [100, 200] (ConfigError naming --lr-milestones unless positive and increasing)."""
    try:
        steps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lr-milestones must be comma-separated step numbers, got {text!r}") from None
    if any(b <= a for a, b in zip(steps, steps[1:])) or any(x < 1 for x in steps):
        raise ConfigError(f"--lr-milestones must be increasing steps >= 1, got {text!r}")
    return steps


def parse_task_weights(text: str) -> dict[str, float]:
    """``"sentiment=2,topic=1"`` -> {"sentiment": 2.0, "topic": 1.0} (ConfigError naming --task-weights
    unless every item is ``task=weight`` with a finite weight > 0 and no task is named twice)."""
    weights: dict[str, float] = {}
    for item in (x.strip() for x in text.split(",")):
        task, sep, value = item.partition("=")
        try:
            weight = float(value) if sep and task.strip() else None
        except ValueError:
            weight = None
        if weight is None:
            raise ConfigError(f"--task-weights: {item!r} is not task=weight (e.g. sentiment=2,topic=1)")
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"--task-weights: weight of task '{task.strip()}' must be a number > 0, got {value.strip()}")
        if task.strip() in weights:
            raise ConfigError(f"--task-weights: task '{task.strip()}' is named twice")
        weights[task.strip()] = weight
    return weights


def task_weight_problems(cfg: TrainConfig) -> list[str]:
    """Problems with ``--task-weights`` that show without reading the data."""
    if not cfg.task_weights:
        return []
    p = []
    try:
        parse_task_weights(cfg.task_weights)
    except ConfigError as e:
        p.append(e.message)
    if cfg.packing:
        p.append("--task-weights does not work with --packing (a packed sequence mixes tasks)")
    return p


def schedule_problems(cfg: TrainConfig) -> list[str]:
    """Problems with the schedule and per-group rate options."""
    p = []
    if cfg.lr_gamma is not None and not 0 < cfg.lr_gamma <= 1:
        p.append("--lr-gamma must be in (0, 1]")
    if cfg.lr_step_size < 0:
        p.append("--lr-step-size must be >= 0")
    try:
        parse_milestones(cfg.lr_milestones)
    except ConfigError as e:
        p.append(e.message)
    if not 0 < cfg.layer_lr_decay <= 1:
        p.append("--layer-lr-decay must be in (0, 1]")
    if cfg.loraplus_lr_ratio <= 0:
        p.append("--loraplus-lr-ratio must be > 0")
    return p


def distributed_problems(cfg: TrainConfig) -> list[str]:
    """Problems with the multi-node and sharding options."""
    p = []
    if cfg.nnodes < 1:
        p.append(f"--nnodes must be >= 1, got {cfg.nnodes}")
    elif not 0 <= cfg.node_rank < cfg.nnodes:
        p.append(f"--node-rank {cfg.node_rank}: must be 0 .. {cfg.nnodes - 1} with --nnodes {cfg.nnodes}")
    if cfg.nnodes > 1 and not cfg.master_addr:
        p.append(f"--nnodes {cfg.nnodes} needs --master-addr (the address of node 0, the same on every node)")
    if not 1 <= cfg.master_port <= 65535:
        p.append(f"--master-port must be a TCP port (1 .. 65535), got {cfg.master_port}")
    if cfg.sharding == "fsdp":
        if cfg.method not in FSDP_METHODS:
            p.append(f"--sharding fsdp supports --method {', '.join(FSDP_METHODS)}, not {cfg.method}")
        if cfg.optimizer != "adamw":
            p.append(f"--sharding fsdp needs --optimizer adamw (bitsandbytes' {cfg.optimizer} cannot update "
                     "sharded weights)")
    return p


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
