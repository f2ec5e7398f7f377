"""What a run writes into ``--output`` and reads back: resumable checkpoints (trainable weights,
optimizer, scheduler, RNG and loop state, each written atomically), the metrics file, and the
final adapter or model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from edgeft.config import TrainConfig
from edgeft.core.errors import ConfigError, EdgeftError
from edgeft.core.fsutil import atomic_dir, atomic_file, clean_partials, ensure_free_space, prepare_output_dir
from edgeft.train.sharding import full_copies, local_part, shard_optimizer_state

METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"
SAVE_SLACK_BYTES = 16 << 20  # tokenizer, configs, optimizer bookkeeping
# Config keys that must match for --resume to continue exactly (and batch_size x processes: the rows
# of a micro-batch, which decide the data order; see resume_batch_problem).
RESUME_KEYS = ("model", "data", "eval_data", "schema", "method", "max_seq_len", "packing", "grad_accum",
               "lr", "lr_scheduler", "warmup_steps", "warmup_ratio", "weight_decay", "optimizer", "seed", "lora_r",
               "lora_alpha", "target_modules", "quant_type", "double_quant", "compute_dtype", "num_virtual_tokens",
               "lr_gamma", "lr_step_size", "lr_milestones", "layer_lr_decay", "loraplus_lr_ratio")


def prepare_output(out: Path, cfg: TrainConfig, *, resume: bool, overwrite: bool, processes: int = 1) -> Path | None:
    """The checkpoint to resume from (``--resume``: it must exist and match ``cfg`` trained by
    ``processes`` processes), or None after making ``out`` an empty directory to train into."""
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise EdgeftError(f"--resume: no complete checkpoint in {out / CKPT_DIR}")
        state = json.loads((ckpt / "state.json").read_text())
        saved = state.get("config", {})
        changed = [k for k in RESUME_KEYS if k in saved and saved[k] != getattr(cfg, k)]
        if changed:
            raise ConfigError(f"--resume: options differ from the checkpointed run: {', '.join(changed)}")
        problem = resume_batch_problem(saved.get("batch_size", cfg.batch_size), state.get("processes", 1),
                                       cfg.batch_size, processes)
        if problem:
            raise ConfigError(problem)
        return ckpt
    prepare_output_dir(out, overwrite=overwrite)
    if overwrite:
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return None


def resume_batch_problem(saved_batch: int, saved_processes: int, batch: int, processes: int) -> str | None:
    """Why a run of ``processes`` x ``batch`` cannot continue a checkpoint of ``saved_processes`` x
    ``saved_batch`` (None if it can): the rows per micro-batch over all processes must stay the same,
    so the data order and the step count continue exactly."""
    rows = saved_batch * saved_processes
    if batch * processes == rows:
        return None
    hint = f"; use --batch-size {rows // processes}" if rows % processes == 0 else ""
    return (f"--resume: the checkpoint was written by {saved_processes} process(es) x --batch-size {saved_batch} "
            f"({rows} rows per micro-batch), this run has {processes} x {batch}{hint}")


def trainable_state(model: Any, keep: bool = True) -> dict[str, Any]:
    """CPU copies of the trainable parameters, by name; sharded ones (FSDP) are gathered, so every rank
    calls this (``keep`` False: a rank that only takes part, and gets {})."""
    return full_copies(((n, p) for n, p in model.named_parameters() if p.requires_grad), keep)


def load_trainable(model: Any, weights: dict[str, Any]) -> None:
    """Copy ``weights`` (name -> tensor, as ``trainable_state`` gives) into the model's parameters."""
    params = dict(model.named_parameters())
    for name, t in weights.items():
        params[name].data.copy_(local_part(t, params[name]))


def save_checkpoint(out: Path, step: int, model: Any, optimizer: Any, scheduler: Any, state: dict, keep: int, *,
                    weights: dict[str, Any] | None = None, optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoints/step-N`` atomically, then prune to the newest ``keep``. ``weights`` and
    ``optimizer_state``, when given, are written instead of the model's and optimizer's own (a sharded
    run passes them gathered)."""
    import torch
    from safetensors.torch import save_file

    root = out / CKPT_DIR
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:07d}"
    # trainable weights + up to two optimizer moments per weight (AdamW), rng and state files
    ensure_free_space(final, 3 * param_bytes(model, trainable_only=True) + SAVE_SLACK_BYTES, f"checkpoint {final.name}")
    with atomic_dir(final, overwrite=True) as tmp:
        save_file(weights if weights is not None else trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def param_bytes(model: Any, *, trainable_only: bool) -> int:
    """Bytes of the model's parameters (only the trainable ones if ``trainable_only``)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out``; partial ones left by a crash are removed."""
    root = out / CKPT_DIR
    clean_partials(root)
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model: Any, optimizer: Any, scheduler: Any) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``ckpt``; returns the loop state saved with it."""
    import torch
    from safetensors.torch import load_file

    try:
        load_trainable(model, load_file(str(ckpt / "trainable.safetensors")))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        shard_optimizer_state(optimizer)
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


def reset_metrics(path: Path, resumed_step: int | None) -> None:
    """A fresh run starts an empty metrics file; a resumed one drops the lines written after its
    checkpoint (the run redoes those steps)."""
    if resumed_step is None:
        path.unlink(missing_ok=True)
        return
    kept = [json.dumps(m) for m in read_metrics(path) if m.get("step", 0) <= resumed_step]
    with atomic_file(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in kept))


def append_metrics(log: Any, record: dict[str, Any]) -> None:
    """One metric line on the open metrics file, flushed so a crash keeps it."""
    log.write(json.dumps(record) + "\n")
    log.flush()


def save_final(model: Any, tok: Any, out: Path, cfg: TrainConfig, state_dict: dict[str, Any] | None = None) -> None:
    """The adapter (standard PEFT layout) or the full model, and the tokenizer; ``state_dict`` (the
    weights gathered from a sharded run) replaces the model's own."""
    need = param_bytes(model, trainable_only=cfg.method != "full") + SAVE_SLACK_BYTES
    ensure_free_space(out, need, "the full model" if cfg.method == "full" else "the adapter")
    with atomic_dir(out / ".final", overwrite=True) as tmp:
        if cfg.method == "full":
            model.config.use_cache = True
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        else:
            model.save_pretrained(tmp, state_dict=state_dict)
        tok.save_pretrained(tmp)
    for p in (out / ".final").iterdir():
        os.replace(p, out / p.name)
    shutil.rmtree(out / ".final", ignore_errors=True)
