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

Under torchrun or ``accelerate launch`` (or ``--num-processes N``) every process runs this recipe as
one rank of a data-parallel run (``distributed.py``; ``sharding.py`` with ``--sharding fsdp``); rank 0
alone writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft.config import TrainConfig
from edgeft.core.fsutil import write_json
from edgeft.core.progress import say
from edgeft.train.batches import plan_batches
from edgeft.train.checkpoint import (load_checkpoint, prepare_output, read_metrics, reset_metrics, save_final,
                                     trainable_state)
from edgeft.train.distributed import (SINGLE, World, all_gather, main_first, peers_lost_as_error, reseed_per_rank,
                                      start_world, stop_world)
from edgeft.train.loop import Outcome, Run, new_state, run_training
from edgeft.train.mixing import task_record
from edgeft.train.model import load_for_training, uses_selective_head
from edgeft.train.optim import build_optimizer, build_scheduler
from edgeft.train.prepare import prepare_inputs
from edgeft.train.record import RUN_RECORD, dtype_name, peak_memory_mb, start_record
from edgeft.train.sharding import full_model_state, make_replicas

CURVES_FILE = "curves.png"


@dataclass
class TrainResult:
    """The figures a finished run reports (the CLI prints ``summary()``)."""

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


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run the whole recipe for ``cfg``; returns the final figures."""
    out = Path(cfg.output)
    world = start_world(cfg)
    with peers_lost_as_error(world, out):
        resume_from = main_first(world, lambda: prepare_output(out, cfg, resume=resume, overwrite=overwrite,
                                                               processes=world.size))
        run, record = setup(cfg, out, resume_from, world)
        outcome = run_training(run)
        result = save(run, record, outcome)
    stop_world(world)  # only after success: after a lost peer, leaving the group could wait on it
    return result


def setup(cfg: TrainConfig, out: Path, resume_from: Path | None, world: World = SINGLE) -> tuple[Run, dict[str, Any]]:
    """Data, model, optimizer and schedule, restored from ``resume_from`` if given; the run record
    is written (rank 0) with ``"status": "running"`` and returned."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    prep = prepare_inputs(cfg)
    say(prep.describe_data(cfg))
    batches, total_steps = plan_batches(cfg, prep.train_examples, world.size)

    model = load_for_training(cfg, prep.model_ref, prep.device, prep.dtype, prep.tok)
    selective = uses_selective_head(cfg, model)
    replicas = make_replicas(cfg, model, selective, world, prep.device)  # FSDP shards the weights in place
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(cfg, params, [n for n, _ in named])
    scheduler = build_scheduler(cfg, optimizer, total_steps)

    state = new_state()
    if resume_from is not None:
        state.update(load_checkpoint(resume_from, model, optimizer, scheduler))
        say(f"resumed from {resume_from.name} (step {state['step']})")
    reseed_per_rank(cfg, world, state["step"])
    run = Run(cfg, out, model, prep.tok, prep.device, selective, params, optimizer, scheduler,
              batches, [[ex] for ex in prep.eval_examples], total_steps, state, world, replicas)

    record = start_record(cfg, prep, trainable=n_trainable, total=n_total, total_steps=total_steps)
    record["processes"] = world.size
    tasks = task_record(prep.train_examples, batches.mix)
    if tasks is not None:
        record["data"]["tasks"] = tasks
    if world.main:
        reset_metrics(run.metrics_path, state["step"] if resume_from is not None else None)
        write_json(out / RUN_RECORD, record)
    ranks = (f" x {world.size} processes ({'FSDP' if replicas.sharded else 'DDP'}, global batch "
             f"{cfg.batch_size * cfg.grad_accum * world.size})" if world.distributed else "")
    say(f"{cfg.method} on {prep.device}{ranks} ({dtype_name(prep.dtype)} compute): {n_trainable:,} trainable of "
        f"{n_total:,} parameters, {total_steps} steps")
    return run, record


def save(run: Run, record: dict[str, Any], outcome: Outcome) -> TrainResult:
    """The adapter (or full model) and tokenizer, the training curves, and the completed run record,
    written by rank 0 (the other ranks wait, and fail with it)."""
    state = run.state
    peaks = [round(mb, 1) for mb in all_gather(run.world, peak_memory_mb(run.device))]
    record.update({
        "status": "completed", "steps": state["step"], "stopped_early": outcome.stopped_early,
        "final_metrics": {"train_loss": outcome.last_loss, "eval_loss": outcome.eval_loss,
                          "best_eval_loss": state["best_eval"], "tokens": state["tokens"],
                          "tokens_per_s": round(outcome.tokens_per_s, 1), "train_time_s": round(outcome.train_s, 2),
                          "peak_memory_mb": max(peaks)},
    })
    if run.world.distributed:
        record["final_metrics"]["peak_memory_mb_per_process"] = peaks
    # Sharded weights are gathered by every rank (rank 0 keeps them) and written as one process writes them.
    weights = None
    if run.replicas.sharded:
        keep = run.world.main
        weights = full_model_state(run.model, keep) if run.cfg.method == "full" else trainable_state(run.model, keep)
    main_first(run.world, lambda: _write_outputs(run, record, weights))
    return TrainResult(run.out, state["step"], outcome.last_loss, outcome.eval_loss, outcome.tokens_per_s,
                       outcome.stopped_early)


def _write_outputs(run: Run, record: dict[str, Any], weights: dict[str, Any] | None) -> None:
    save_final(run.model, run.tok, run.out, run.cfg, weights)
    metrics = read_metrics(run.metrics_path)
    if metrics:
        from edgeft.plots import training_curves

        training_curves(metrics, run.out / CURVES_FILE)
    write_json(run.out / RUN_RECORD, record)
