"""Fine-tuning recipe: setup -> train -> save.

Memory-frugal by default: a 4-bit NF4 base (bitsandbytes, double quantization), LoRA adapters,
gradient checkpointing and a paged 8-bit optimizer. Two choices make it fast too:

- the compute dtype follows the device (bf16 on GPUs that support it; fp32 on CPU, where
  bf16 matmuls are about twice as slow);
- the loss is computed only where it counts: the output projection (vocabulary-sized, the
  largest activation of a small model) runs on response tokens only, never on prompt or pad
  positions, and batches group rows of similar length so little padding is computed at all.

Checkpoints hold the trainable weights, optimizer, scheduler and RNG state and the position in
the data stream, written atomically; ``--resume`` continues the same data order and schedule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from edgeft.cpumem import (LOAD_MMAP_THRESHOLD, STEP_MMAP_THRESHOLD, dequantize_in_compute_dtype,
                           release_file_mappings, set_mmap_threshold)
from edgeft.config import PEFT_PROMPT_METHODS, TrainConfig, to_dict
from edgeft.data import IGNORE_INDEX, Tokenized, load_rows, pack, split_eval, tokenize_rows
from edgeft.errors import ConfigError, EdgeftError
from edgeft.fsutil import atomic_dir, atomic_file, clean_partials, ensure_free_space, prepare_output_dir, write_json
from edgeft.progress import say, step_progress

RUN_RECORD = "edgeft-run.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CKPT_DIR = "checkpoints"
SAVE_SLACK_BYTES = 16 << 20  # tokenizer, configs, optimizer bookkeeping
# Model families whose output is plain ``lm_head(final_hidden)``: the loss can skip the
# projection of prompt and pad positions. Others go through the model's own forward.
SELECTIVE_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2"}
# Config keys that must match for --resume to continue exactly.
RESUME_KEYS = ("model", "data", "eval_data", "schema", "method", "max_seq_len", "packing", "batch_size", "grad_accum",
               "lr", "lr_scheduler", "warmup_steps", "warmup_ratio", "weight_decay", "optimizer", "seed", "lora_r",
               "lora_alpha", "target_modules", "quant_type", "double_quant", "compute_dtype", "num_virtual_tokens")


@dataclass
class TrainResult:
    output: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    tokens_per_s: float
    stopped_early: bool

    def summary(self) -> str:
        ev = f", eval loss {self.eval_loss:.4f}" if self.eval_loss is not None else ""
        tl = f"train loss {self.train_loss:.4f}" if self.train_loss is not None else "no step run"
        early = " (early stop)" if self.stopped_early else ""
        return f"trained {self.steps} steps{early}: {tl}{ev}, {self.tokens_per_s:.0f} tokens/s -> {self.output}"


# ---------------------------------------------------------------------------------------------
# Device and model


def pick_device(cfg: TrainConfig) -> tuple[str, Any]:
    """(device, compute dtype) for this config and machine."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch (is a CUDA build of torch installed?)")
    if cfg.compute_dtype != "auto":
        dtype = getattr(torch, cfg.compute_dtype)
    elif device == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if device == "cpu" and dtype == torch.float16:
        raise ConfigError("--compute-dtype float16 is not supported on CPU; use float32 or bfloat16")
    return device, dtype


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 dot-product instructions (AVX512-BF16 or AMX), where bf16 matmuls
    run about twice as fast as fp32 (one AMD EPYC core: 189 vs 88 GFLOP/s for a 512x576x1536
    matmul). Elsewhere bf16 is emulated and slower, so fp32 is the right compute dtype."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def check_bitsandbytes(device: str) -> None:
    """Fail early, before weights load, if bitsandbytes 4-bit cannot run on ``device``."""
    try:
        import bitsandbytes.functional as bnbf
        import torch

        w = torch.randn(64, 64, device=device)
        q, state = bnbf.quantize_4bit(w, quant_type="nf4")
        bnbf.dequantize_4bit(q, state)
    except Exception as e:  # import errors, missing native library, unsupported device
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeftError(
            f"--method qlora: bitsandbytes 4-bit cannot run on {device} here ({msg[:200]}); use --method lora"
        ) from None


def load_model(cfg: TrainConfig, model_ref: str, device: str, dtype: Any, tokenizer: Any):
    """The model to train: 4-bit + LoRA, 16-bit + LoRA, full, or a prompt-learning method."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code, "use_safetensors": None}
    if cfg.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["device_map"] = {"": device if device == "cpu" else 0}
        # Weights are quantized from their fp32 values and the layers bitsandbytes keeps in 16/32
        # bits stay fp32 (as prepare_model_for_kbit_training wants); only matmuls use ``dtype``.
        kwargs["dtype"] = torch.float32
    else:
        kwargs["dtype"] = dtype if device == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(model_ref, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeftError(f"--model {model_ref}: cannot load model: {first[:300]}") from None
    if cfg.method == "qlora":
        release_file_mappings(model)
        dequantize_in_compute_dtype(model, dtype)
    else:
        model.to(device)
    model.config.use_cache = False

    from peft import (LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType,
                      get_peft_model, prepare_model_for_kbit_training)

    gc_kwargs = {"use_reentrant": False}
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif cfg.gradient_checkpointing and cfg.method not in PEFT_PROMPT_METHODS:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        if cfg.method == "lora":
            model.enable_input_require_grads()

    targets: Any = "all-linear" if cfg.target_modules == "all-linear" else [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
    if cfg.method in ("qlora", "lora"):
        peft_cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                              lora_dropout=cfg.lora_dropout, target_modules=targets, bias="none")
    elif cfg.method == "prompt-tuning":
        peft_cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    elif cfg.method == "prefix-tuning":
        peft_cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    elif cfg.method == "p-tuning":
        peft_cfg = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                                       encoder_hidden_size=model.config.hidden_size)
    else:  # full fine-tuning
        return model
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"--target-modules {cfg.target_modules}: {str(e).splitlines()[0][:300]}") from None


def build_optimizer(cfg: TrainConfig, params: list) -> Any:
    import torch

    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
           "adamw_8bit": bnb.optim.AdamW8bit}[cfg.optimizer]
    return cls(groups, lr=cfg.lr)


def build_scheduler(cfg: TrainConfig, optimizer: Any, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# ---------------------------------------------------------------------------------------------
# Batches


class Batches:
    """Deterministic micro-batch stream: epoch ``e`` is a function of (seed, e) alone.

    Units (rows, or packs of rows) are shuffled, grouped by length within windows of
    ``32 x batch_size`` so a batch pads little, and the batch order is shuffled again.
    """

    def __init__(self, units: list[list[Tokenized]], batch_size: int, seed: int):
        self.units, self.batch_size, self.seed = units, batch_size, seed
        self.per_epoch = math.ceil(len(units) / batch_size)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        perm = torch.randperm(len(self.units), generator=g).tolist()
        window = self.batch_size * 32
        batches = []
        for w in range(0, len(perm), window):
            chunk = sorted(perm[w : w + window], key=lambda i: -self.unit_len(i))
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def unit_len(self, i: int) -> int:
        return sum(len(ex.input_ids) for ex in self.units[i])

    def stream(self, start: int) -> Iterator[tuple[int, list[list[Tokenized]]]]:
        """Micro-batches from global index ``start`` on, forever (epochs repeat)."""
        m = start
        while True:
            epoch, pos = divmod(m, self.per_epoch)
            order = self.epoch_order(epoch)
            for idx in order[pos:]:
                yield m, [self.units[i] for i in idx]
                m += 1


def collate(batch: list[list[Tokenized]], pad_id: int, device: str, *, need_mask: bool) -> dict[str, Any]:
    """Right-padded tensors. Packed units get position ids that restart at every row, which
    transformers turns into a block-diagonal causal mask (no attention across rows)."""
    import torch

    lens = [sum(len(ex.input_ids) for ex in unit) for unit in batch]
    T = max(lens)
    T = min(T + (-T) % 8, max(T, 8))  # a multiple of 8 where cheap: friendlier matmul shapes
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(batch), T), dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    packed = any(len(unit) > 1 for unit in batch)
    for b, unit in enumerate(batch):
        t = 0
        for ex in unit:
            n = len(ex.input_ids)
            ids[b, t : t + n] = torch.tensor(ex.input_ids)
            labels[b, t : t + n] = torch.tensor(ex.labels)
            labels[b, t] = IGNORE_INDEX  # never predict a row's first token from the row before it
            pos[b, t : t + n] = torch.arange(n)
            t += n
        mask[b, :t] = 1
        pos[b, t:] = torch.arange(T - t) + (pos[b, t - 1] + 1 if t else 0)
    out = {"input_ids": ids.to(device), "labels": labels.to(device)}
    if need_mask:
        out["attention_mask"] = mask.to(device)
    elif packed:
        out["position_ids"] = pos.to(device)
    return out


# ---------------------------------------------------------------------------------------------
# Loss


def loss_sum(model: Any, batch: dict[str, Any], selective: bool) -> tuple[Any, int]:
    """Summed cross-entropy over target tokens, and their count."""
    import torch.nn.functional as F

    labels = batch["labels"]
    if not selective:
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        logits = out.logits
        # Prompt-learning methods prepend virtual tokens: align on the last positions.
        logits = logits[:, -labels.shape[1] :]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        sel = logits[:, :-1][keep].float()
        return F.cross_entropy(sel, targets[keep], reduction="sum"), int(keep.sum())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(
        input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False
    ).last_hidden_state  # (B, T, d)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, T-1)
    h = hidden[:, :-1][keep]  # (n, d): only positions that predict a response token
    logits = base.get_output_embeddings()(h).float()  # (n, V)
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


def _n_targets(unit: list[Tokenized]) -> int:
    """Target tokens of a unit (labels are shifted by one: the first position never counts)."""
    return sum(sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX) for ex in unit)


def evaluate(model: Any, units: list[list[Tokenized]], cfg: TrainConfig, pad_id: int, device: str, selective: bool) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(units), cfg.batch_size):
            batch = collate(units[i : i + cfg.batch_size], pad_id, device, need_mask=not selective)
            s, n = loss_sum(model, batch, selective)
            total += float(s)
            count += n
    model.train()
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, step: int, model: Any, optimizer: Any, scheduler: Any, state: dict, keep: int) -> Path:
    """Write ``checkpoints/step-N`` atomically, then prune to the newest ``keep``."""
    import torch
    from safetensors.torch import save_file

    root = out / CKPT_DIR
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:07d}"
    # trainable weights + up to two optimizer moments per weight (AdamW), rng and state files
    ensure_free_space(final, 3 * _param_bytes(model, trainable_only=True) + SAVE_SLACK_BYTES, f"checkpoint {final.name}")
    with atomic_dir(final, overwrite=True) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _param_bytes(model: Any, *, trainable_only: bool) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


def latest_checkpoint(out: Path) -> Path | None:
    root = out / CKPT_DIR
    clean_partials(root)
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model: Any, optimizer: Any, scheduler: Any) -> dict:
    import torch
    from safetensors.torch import load_file

    try:
        weights = load_file(str(ckpt / "trainable.safetensors"))
        params = dict(model.named_parameters())
        for name, t in weights.items():
            params[name].data.copy_(t.to(params[name].device))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
        state = json.loads((ckpt / "state.json").read_text())
    except Exception as e:  # any unreadable part makes the checkpoint unusable
        raise EdgeftError(f"{ckpt}: checkpoint unreadable ({type(e).__name__}: {str(e)[:200]}); "
                          "delete it to resume from the one before") from None
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# ---------------------------------------------------------------------------------------------
# Records


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("edgeft", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "machine": platform.machine(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# The recipe


def _prepare(cfg: TrainConfig):
    """Everything that can fail on bad input, before any weights load."""
    from edgeft.models import check_weights_safe, load_tokenizer, resolve_model

    rows, report = load_rows(cfg.data, cfg.schema, skip_bad=cfg.skip_bad_rows)
    if report.skipped:
        say(f"[yellow]skipped {len(report.skipped)} bad rows[/] (first: {report.skipped[0]})")
    eval_rows = None
    if cfg.eval_data:
        eval_rows, eval_report = load_rows(cfg.eval_data, cfg.schema, skip_bad=cfg.skip_bad_rows)
        report.skipped += eval_report.skipped
    model_ref = resolve_model(cfg.model)
    check_weights_safe(model_ref, allow_pickle=cfg.allow_pickle, flag="--allow-pickle")
    device, dtype = pick_device(cfg)
    if cfg.method == "qlora":
        check_bitsandbytes(device)
    tok = load_tokenizer(model_ref, trust_remote_code=cfg.trust_remote_code)
    examples, stats = tokenize_rows(tok, rows, cfg.max_seq_len)
    if not examples:
        raise EdgeftError(f"{cfg.data}: no row has response tokens left within --max-seq-len {cfg.max_seq_len}")
    if eval_rows is not None:
        eval_examples, _ = tokenize_rows(tok, eval_rows, cfg.max_seq_len)
        train_examples = examples
    else:
        train_examples, eval_examples = split_eval(examples, cfg.eval_split, cfg.seed)
    return model_ref, device, dtype, tok, train_examples, eval_examples, stats, report


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run the whole recipe for ``cfg``; returns the final figures."""
    import torch

    out = Path(cfg.output)
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise EdgeftError(f"--resume: no complete checkpoint in {out / CKPT_DIR}")
        saved = json.loads((ckpt / "state.json").read_text()).get("config", {})
        changed = [k for k in RESUME_KEYS if k in saved and saved[k] != getattr(cfg, k)]
        if changed:
            raise ConfigError(f"--resume: options differ from the checkpointed run: {', '.join(changed)}")
    else:
        prepare_output_dir(out, overwrite=overwrite)
        if overwrite:
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model_ref, device, dtype, tok, train_ex, eval_ex, stats, report = _prepare(cfg)
    say(f"data: {stats.examples} rows ({report.schema}), {len(train_ex)} train / {len(eval_ex)} eval, "
        f"{stats.truncated} truncated to {cfg.max_seq_len} tokens, {stats.dropped_no_target} dropped (no response left)")

    units = pack(train_ex, cfg.max_seq_len) if cfg.packing else [[ex] for ex in train_ex]
    eval_units = [[ex] for ex in eval_ex]
    batches = Batches(units, cfg.batch_size, cfg.seed)
    steps_per_epoch = math.ceil(batches.per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    if device == "cpu":
        set_mmap_threshold(LOAD_MMAP_THRESHOLD)
    model = load_model(cfg, model_ref, device, dtype, tok)
    if device == "cpu":
        set_mmap_threshold(STEP_MMAP_THRESHOLD)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    selective = cfg.method not in PEFT_PROMPT_METHODS and model_type in SELECTIVE_HEAD_TYPES
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, total_steps)

    state: dict[str, Any] = {"step": 0, "micro": 0, "best_eval": None, "bad_evals": 0, "tokens": 0}
    if ckpt is not None:
        state.update(load_checkpoint(ckpt, model, optimizer, scheduler))
        say(f"resumed from {ckpt.name} (step {state['step']})")
    metrics_path = out / METRICS_FILE
    if ckpt is None:
        metrics_path.unlink(missing_ok=True)
    else:  # drop lines written after the checkpoint: the run redoes those steps
        kept = [json.dumps(m) for m in read_metrics(metrics_path) if m.get("step", 0) <= state["step"]]
        with atomic_file(metrics_path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in kept))

    run_record = {
        "method": cfg.method, "base_model": model_ref, "base_model_ref": cfg.model,
        "torch_dtype": "float32" if cfg.method == "qlora" or device == "cpu" else str(dtype).replace("torch.", ""),
        "quantization": ({"load_in_4bit": True, "quant_type": cfg.quant_type, "double_quant": cfg.double_quant,
                          "compute_dtype": str(dtype).replace("torch.", ""), "quant_storage": "uint8", "blocksize": 64}
                         if cfg.method == "qlora" else None),
        "config": to_dict(cfg), "versions": versions(), "device": device_info(device),
        "data": {"schema": report.schema, "rows": stats.examples, "train_rows": len(train_ex), "eval_rows": len(eval_ex),
                 "truncated": stats.truncated, "dropped_no_target": stats.dropped_no_target,
                 "skipped_bad_rows": len(report.skipped), "skipped_examples": report.skipped[:20]},
        "parameters": {"trainable": n_trainable, "total": n_total}, "total_steps": total_steps,
        "status": "running",
    }
    write_json(out / RUN_RECORD, run_record)
    say(f"{cfg.method} on {device} ({str(dtype).replace('torch.', '')} compute): {n_trainable:,} trainable of "
        f"{n_total:,} parameters, {total_steps} steps")

    best_state = None
    stopped_early = False
    last_loss = None
    eval_loss = state.get("last_eval")
    stream = batches.stream(state["micro"])
    t_start = time.perf_counter()
    tokens_at_start = state["tokens"]
    start_step = state["step"]
    with step_progress("train", "loss", "lr", "tps") as bar, open(metrics_path, "a") as mlog:
        task = bar.add_task("train", total=total_steps, completed=state["step"], loss="", lr="", tps="")
        try:
            while state["step"] < total_steps:
                micro = [next(stream) for _ in range(cfg.grad_accum)]
                # Normalise by all target tokens of the optimizer step (not per micro-batch), so
                # gradient accumulation gives the same update as one large batch.
                denom = max(1, sum(_n_targets(unit) for _, mb in micro for unit in mb))
                loss_total = 0.0
                step_tokens = 0
                for _, mb in micro:
                    batch = collate(mb, tok.pad_token_id, device, need_mask=not selective)
                    s, _ = loss_sum(model, batch, selective)
                    (s / denom).backward()
                    loss_total += float(s)
                    step_tokens += sum(len(ex.input_ids) for unit in mb for ex in unit)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["micro"] = micro[-1][0] + 1
                state["tokens"] += step_tokens
                last_loss = loss_total / denom
                if not math.isfinite(last_loss):
                    raise EdgeftError(f"loss became {last_loss} at step {state['step']}; lower --lr or check the data "
                                      f"(last good checkpoint kept in {out / CKPT_DIR})")
                elapsed = time.perf_counter() - t_start
                tps = (state["tokens"] - tokens_at_start) / max(elapsed, 1e-9)
                lr = scheduler.get_last_lr()[0]
                rec: dict[str, Any] = {"step": state["step"], "loss": round(last_loss, 6), "lr": lr,
                                       "tokens": state["tokens"], "tokens_per_s": round(tps, 1),
                                       "elapsed_s": round(elapsed, 3)}
                if cfg.eval_every and eval_units and state["step"] % cfg.eval_every == 0:
                    eval_loss = evaluate(model, eval_units, cfg, tok.pad_token_id, device, selective)
                    rec["eval_loss"] = round(eval_loss, 6)
                    state["last_eval"] = eval_loss
                    if state["best_eval"] is None or eval_loss < state["best_eval"]:
                        state["best_eval"], state["bad_evals"] = eval_loss, 0
                        if cfg.early_stopping_patience:
                            best_state = trainable_state(model)
                    else:
                        state["bad_evals"] += 1
                if state["step"] % cfg.log_every == 0 or "eval_loss" in rec or state["step"] == total_steps:
                    mlog.write(json.dumps(rec) + "\n")
                    mlog.flush()
                bar.update(task, completed=state["step"], loss=f"loss {last_loss:.4f}", lr=f"lr {lr:.2e}", tps=f"{tps:.0f} tok/s")
                if bar.disable and (state["step"] % max(1, total_steps // 10) == 0 or state["step"] == total_steps):
                    eta = (total_steps - state["step"]) * elapsed / max(1, state["step"] - start_step)
                    say(f"step {state['step']}/{total_steps}  loss {last_loss:.4f}  lr {lr:.2e}  {tps:.0f} tok/s  "
                        f"ETA {eta:.0f}s")
                if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                    stopped_early = True
                    say(f"early stop at step {state['step']}: eval loss did not improve for {state['bad_evals']} evaluations")
                    break
                if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total_steps:
                    save_checkpoint(out, state["step"], model, optimizer, scheduler,
                                    {**state, "config": to_dict(cfg)}, cfg.keep_checkpoints)
        except torch.OutOfMemoryError:
            from edgeft.cli import OOM_HINT

            raise EdgeftError(f"{OOM_HINT} (last good checkpoint kept in {out / CKPT_DIR})") from None
        except RuntimeError as e:
            if "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower():
                from edgeft.cli import OOM_HINT

                raise EdgeftError(f"{OOM_HINT} (last good checkpoint kept in {out / CKPT_DIR})") from None
            raise

    elapsed = time.perf_counter() - t_start
    tps = (state["tokens"] - tokens_at_start) / max(elapsed, 1e-9)
    if best_state is not None and stopped_early:
        params_by_name = dict(model.named_parameters())
        for n, t in best_state.items():
            params_by_name[n].data.copy_(t.to(params_by_name[n].device))
        eval_loss = state["best_eval"]
        say(f"restored the best evaluated weights (eval loss {eval_loss:.4f})")
    if eval_units and (not cfg.eval_every or state["step"] % cfg.eval_every != 0) and not stopped_early:
        eval_loss = evaluate(model, eval_units, cfg, tok.pad_token_id, device, selective)
        with open(metrics_path, "a") as mlog:
            mlog.write(json.dumps({"step": state["step"], "eval_loss": round(eval_loss, 6)}) + "\n")

    _save_final(model, tok, out, cfg)
    metrics = read_metrics(metrics_path)
    if metrics:
        from edgeft.plots import training_curves

        training_curves(metrics, out / CURVES_FILE)
    run_record.update({
        "status": "completed", "steps": state["step"], "stopped_early": stopped_early,
        "final_metrics": {"train_loss": last_loss, "eval_loss": eval_loss, "best_eval_loss": state["best_eval"],
                          "tokens": state["tokens"], "tokens_per_s": round(tps, 1),
                          "peak_memory_mb": round(peak_memory_mb(device), 1)},
    })
    write_json(out / RUN_RECORD, run_record)
    return TrainResult(out, state["step"], last_loss, eval_loss, tps, stopped_early)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Metric lines of a run; a line cut short by a crash is ignored."""
    out = []
    if path.is_file():
        for ln in path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(ln))
            except ValueError:
                continue
    return out


def _save_final(model: Any, tok: Any, out: Path, cfg: TrainConfig) -> None:
    """The adapter (standard PEFT layout) or the full model, and the tokenizer."""
    need = _param_bytes(model, trainable_only=cfg.method != "full") + SAVE_SLACK_BYTES
    ensure_free_space(out, need, "the full model" if cfg.method == "full" else "the adapter")
    with atomic_dir(out / ".final", overwrite=True) as tmp:
        if cfg.method == "full":
            model.config.use_cache = True
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    for p in (out / ".final").iterdir():
        os.replace(p, out / p.name)
    shutil.rmtree(out / ".final", ignore_errors=True)
