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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft.config import TrainConfig
from edgeft.core.fsutil import write_json
from edgeft.core.progress import say
from edgeft.train.batches import plan_batches
from edgeft.train.checkpoint import load_checkpoint, prepare_output, read_metrics, reset_metrics, save_final
from edgeft.train.loop import Outcome, Run, new_state, run_training
from edgeft.train.model import load_for_training, uses_selective_head
from edgeft.train.optim import build_optimizer, build_scheduler
from edgeft.train.prepare import prepare_inputs
from edgeft.train.record import RUN_RECORD, dtype_name, peak_memory_mb, start_record

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
    resume_from = prepare_output(out, cfg, resume=resume, overwrite=overwrite)
    run, record = setup(cfg, out, resume_from)
    outcome = run_training(run)
    return save(run, record, outcome)


def setup(cfg: TrainConfig, out: Path, resume_from: Path | None) -> tuple[Run, dict[str, Any]]:
    """Data, model, optimizer and schedule, restored from ``resume_from`` if given; the run record
    is written with ``"status": "running"`` and returned."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    prep = prepare_inputs(cfg)
    say(prep.describe_data(cfg))
    batches, total_steps = plan_batches(cfg, prep.train_examples)

    model = load_for_training(cfg, prep.model_ref, prep.device, prep.dtype, prep.tok)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, total_steps)

    state = new_state()
    if resume_from is not None:
        state.update(load_checkpoint(resume_from, model, optimizer, scheduler))
        say(f"resumed from {resume_from.name} (step {state['step']})")
    run = Run(cfg, out, model, prep.tok, prep.device, uses_selective_head(cfg, model), params, optimizer, scheduler,
              batches, [[ex] for ex in prep.eval_examples], total_steps, state)
    reset_metrics(run.metrics_path, state["step"] if resume_from is not None else None)

    record = start_record(cfg, prep, trainable=n_trainable, total=n_total, total_steps=total_steps)
    write_json(out / RUN_RECORD, record)
    say(f"{cfg.method} on {prep.device} ({dtype_name(prep.dtype)} compute): {n_trainable:,} trainable of "
        f"{n_total:,} parameters, {total_steps} steps")
    return run, record


def save(run: Run, record: dict[str, Any], outcome: Outcome) -> TrainResult:
    """The adapter (or full model) and tokenizer, the training curves, and the completed run record."""
    state = run.state
    save_final(run.model, run.tok, run.out, run.cfg)
    metrics = read_metrics(run.metrics_path)
    if metrics:
        from edgeft.plots import training_curves

        training_curves(metrics, run.out / CURVES_FILE)
    record.update({
        "status": "completed", "steps": state["step"], "stopped_early": outcome.stopped_early,
        "final_metrics": {"train_loss": outcome.last_loss, "eval_loss": outcome.eval_loss,
                          "best_eval_loss": state["best_eval"], "tokens": state["tokens"],
                          "tokens_per_s": round(outcome.tokens_per_s, 1),
                          "peak_memory_mb": round(peak_memory_mb(run.device), 1)},
    })
    write_json(run.out / RUN_RECORD, record)
    return TrainResult(run.out, state["step"], outcome.last_loss, outcome.eval_loss, outcome.tokens_per_s,
                       outcome.stopped_early)
