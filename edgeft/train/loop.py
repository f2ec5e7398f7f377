"""The training loop: optimizer steps over the batch stream with gradient accumulation, evaluation
every ``--eval-every`` steps with early stopping, checkpoints, metric lines and progress; an
out-of-memory error becomes a one-line hint that names the knobs which lower memory.

With several processes (``distributed.py``) every rank runs this loop on its share of each
micro-batch; losses are summed over ranks, so evaluation and early stopping agree, and only rank 0
writes metric lines and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeft.config import TrainConfig, to_dict
from edgeft.core.errors import OOM_HINT, EdgeftError
from edgeft.core.progress import say, step_progress
from edgeft.data import Tokenized
from edgeft.train.batches import Batches, collate, loss_sum, n_targets, n_tokens
from edgeft.train.checkpoint import (CKPT_DIR, METRICS_FILE, append_metrics, load_trainable, save_checkpoint,
                                     trainable_state)
from edgeft.train.distributed import SINGLE, Replicas, World, all_sum, shard
from edgeft.train.optim import apply_update
from edgeft.train.sharding import full_optimizer_state


@dataclass
class Run:
    """What the loop trains, as the recipe set it up. ``state`` is the part a checkpoint saves:
    step, micro-batch index, tokens seen, best and last eval loss, evaluations without improvement."""

    cfg: TrainConfig
    out: Path
    model: Any
    tok: Any
    device: str
    selective: bool  # the loss projects response positions only (see loss_sum)
    params: list
    optimizer: Any
    scheduler: Any
    batches: Batches
    eval_units: list[list[Tokenized]]
    total_steps: int
    state: dict[str, Any]
    world: World = SINGLE
    replicas: Any = None  # the loss through DDP or FSDP (sharding.make_replicas) when several processes train

    def __post_init__(self) -> None:
        if self.replicas is None:
            self.replicas = Replicas(self.model, self.selective, self.world, self.device)

    @property
    def metrics_path(self) -> Path:
        return self.out / METRICS_FILE

    def metrics_log(self) -> Any:
        """The metrics file opened for appending (rank 0), or a sink (other ranks)."""
        return open(self.metrics_path if self.world.main else os.devnull, "a")


@dataclass
class Outcome:
    """The figures of a finished loop."""

    last_loss: float | None = None
    eval_loss: float | None = None
    stopped_early: bool = False
    tokens_per_s: float = 0.0
    train_s: float = 0.0  # seconds in the loop (this process: a resumed run counts from its resume)
    best_state: dict[str, Any] | None = None  # weights at the best eval loss, kept for early stopping


def new_state() -> dict[str, Any]:
    """The loop state of a run that starts from step 0."""
    return {"step": 0, "micro": 0, "best_eval": None, "bad_evals": 0, "tokens": 0}


class _Throughput:
    """Seconds since the loop started and training tokens per second since then."""

    def __init__(self, tokens: int):
        self.start, self.tokens_at_start = time.perf_counter(), tokens

    def read(self, tokens: int) -> tuple[float, float]:
        elapsed = time.perf_counter() - self.start
        return elapsed, (tokens - self.tokens_at_start) / max(elapsed, 1e-9)


def run_training(run: Run) -> Outcome:
    """Train to ``run.total_steps`` (or an early stop), then evaluate the weights that are kept."""
    outcome = Outcome(eval_loss=run.state.get("last_eval"))
    clock = _Throughput(run.state["tokens"])
    _train_steps(run, outcome, clock)
    outcome.train_s, outcome.tokens_per_s = clock.read(run.state["tokens"])
    if outcome.best_state is not None and outcome.stopped_early:
        load_trainable(run.model, outcome.best_state)
        outcome.eval_loss = run.state["best_eval"]
        say(f"restored the best evaluated weights (eval loss {outcome.eval_loss:.4f})")
    cfg = run.cfg
    if run.eval_units and (not cfg.eval_every or run.state["step"] % cfg.eval_every != 0) and not outcome.stopped_early:
        outcome.eval_loss = _evaluate_run(run)
        with run.metrics_log() as mlog:
            append_metrics(mlog, {"step": run.state["step"], "eval_loss": round(outcome.eval_loss, 6)})
    return outcome


def _train_steps(run: Run, outcome: Outcome, clock: _Throughput) -> None:
    cfg, state = run.cfg, run.state
    stream = run.batches.stream(state["micro"])
    start_step = state["step"]
    with (step_progress("train", "loss", "lr", "tps") as bar, run.metrics_log() as mlog,
          _out_of_memory_as_hint(run.out)):
        task = bar.add_task("train", total=run.total_steps, completed=state["step"], loss="", lr="", tps="")
        while state["step"] < run.total_steps:
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            loss, tokens = _optimizer_step(run, micro)
            state["step"] += 1
            state["micro"] = micro[-1][0] + 1
            state["tokens"] += tokens
            outcome.last_loss = loss
            if not math.isfinite(loss):
                raise EdgeftError(f"loss became {loss} at step {state['step']}; lower --lr or check the data "
                                  f"(last good checkpoint kept in {run.out / CKPT_DIR})")
            elapsed, tps = clock.read(state["tokens"])
            lr = run.scheduler.get_last_lr()[0]
            rec: dict[str, Any] = {"step": state["step"], "loss": round(loss, 6), "lr": lr, "tokens": state["tokens"],
                                   "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed, 3)}
            if cfg.eval_every and run.eval_units and state["step"] % cfg.eval_every == 0:
                _periodic_evaluation(run, outcome, rec)
            if state["step"] % cfg.log_every == 0 or "eval_loss" in rec or state["step"] == run.total_steps:
                append_metrics(mlog, rec)
            bar.update(task, completed=state["step"], loss=f"loss {loss:.4f}", lr=f"lr {lr:.2e}", tps=f"{tps:.0f} tok/s")
            if bar.disable:
                _say_progress(run, loss, lr, tps, elapsed, start_step)
            if cfg.early_stopping_patience and state["bad_evals"] >= cfg.early_stopping_patience:
                outcome.stopped_early = True
                say(f"early stop at step {state['step']}: eval loss did not improve for {state['bad_evals']} evaluations")
                break
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < run.total_steps:
                _checkpoint(run)


def _checkpoint(run: Run) -> None:
    """Rank 0 writes a checkpoint; with sharded weights every rank first takes part in gathering the
    full weights and optimizer state, so the checkpoint is the one a single process writes."""
    world, state = run.world, run.state
    gathered: dict[str, Any] = {}
    if run.replicas.sharded:
        gathered = {"weights": trainable_state(run.model, keep=world.main),
                    "optimizer_state": full_optimizer_state(run.optimizer, keep=world.main)}
    if world.main:
        save_checkpoint(run.out, state["step"], run.model, run.optimizer, run.scheduler,
                        {**state, "config": to_dict(run.cfg), "processes": world.size}, run.cfg.keep_checkpoints,
                        **gathered)


def _optimizer_step(run: Run, micro: list[tuple[int, list[list[Tokenized]]]]) -> tuple[float, int]:
    """One optimizer step over ``--grad-accum`` micro-batches: (loss per target token, tokens), both
    over all ranks."""
    # Normalise by all target tokens of the optimizer step (not per micro-batch, not per rank: every
    # rank knows the whole plan), so accumulation and processes give the same update as one large
    # batch. DDP averages gradients over ranks, hence the factor world.size.
    world, last = run.world, len(micro) - 1
    denom = max(1, sum(n_targets(unit) for _, mb in micro for unit in mb))
    loss_total = 0.0
    step_tokens = 0
    for i, (_, mb) in enumerate(micro):
        mine, weight = shard(world, mb)
        batch = collate(mine, run.tok.pad_token_id, run.device, need_mask=not run.selective)
        with run.replicas.accumulating(last=i == last):
            s = run.replicas.loss(batch)
            (s * (weight * world.size) / denom).backward()
        loss_total += weight * float(s)
        step_tokens += n_tokens(mb)
    apply_update(run.cfg, run.params, run.optimizer, run.scheduler)
    loss_total, = all_sum(world, [loss_total])
    return loss_total / denom, step_tokens


def _periodic_evaluation(run: Run, outcome: Outcome, rec: dict[str, Any]) -> None:
    """Evaluate, add the loss to the step's metric line, and keep count for early stopping."""
    state = run.state
    outcome.eval_loss = _evaluate_run(run)
    rec["eval_loss"] = round(outcome.eval_loss, 6)
    state["last_eval"] = outcome.eval_loss
    if state["best_eval"] is None or outcome.eval_loss < state["best_eval"]:
        state["best_eval"], state["bad_evals"] = outcome.eval_loss, 0
        if run.cfg.early_stopping_patience:
            outcome.best_state = trainable_state(run.model)
    else:
        state["bad_evals"] += 1


def _say_progress(run: Run, loss: float, lr: float, tps: float, elapsed: float, start_step: int) -> None:
    """Without a progress bar (output is not a terminal): a status line every tenth of the run."""
    step, total = run.state["step"], run.total_steps
    if step % max(1, total // 10) == 0 or step == total:
        eta = (total - step) * elapsed / max(1, step - start_step)
        say(f"step {step}/{total}  loss {loss:.4f}  lr {lr:.2e}  {tps:.0f} tok/s  ETA {eta:.0f}s")


@contextlib.contextmanager
def _out_of_memory_as_hint(out: Path) -> Iterator[None]:
    """Turn an out-of-memory error (CUDA, or CPU allocation) into the user-facing hint."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise EdgeftError(f"{OOM_HINT} (last good checkpoint kept in {out / CKPT_DIR})") from None
    except RuntimeError as e:
        if "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower():
            raise EdgeftError(f"{OOM_HINT} (last good checkpoint kept in {out / CKPT_DIR})") from None
        raise


def _evaluate_run(run: Run) -> float:
    """Eval loss over all eval rows, in batches of ``batch_size x processes`` rows shared out as in
    training (so every rank runs as many forwards, as FSDP needs); the sums are shared."""
    world, rows = run.world, run.cfg.batch_size * run.world.size
    total, count = 0.0, 0.0
    for i in range(0, len(run.eval_units), rows):
        mine, weight = shard(world, run.eval_units[i : i + rows])
        s, n = eval_sums(run.model, mine, run.cfg, run.tok.pad_token_id, run.device, run.selective,
                         sums=run.replicas.sums)
        total, count = total + weight * s, count + weight * n
    total, count = all_sum(world, [total, count])
    return total / max(count, 1)


def evaluate(model: Any, units: list[list[Tokenized]], cfg: TrainConfig, pad_id: int, device: str, selective: bool) -> float:
    """Mean cross-entropy per target token over ``units``, without gradients; the model is left in train mode."""
    total, count = eval_sums(model, units, cfg, pad_id, device, selective)
    return total / max(count, 1)


def eval_sums(model: Any, units: list[list[Tokenized]], cfg: TrainConfig, pad_id: int, device: str,
              selective: bool, sums: Callable[[dict[str, Any]], tuple[Any, int]] | None = None) -> tuple[float, int]:
    """(summed cross-entropy, target tokens) over ``units``, without gradients (``sums`` of a batch when
    given, e.g. through the sharded model; else ``loss_sum``); the model is left in train mode."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(units), cfg.batch_size):
            batch = collate(units[i : i + cfg.batch_size], pad_id, device, need_mask=not selective)
            s, n = sums(batch) if sums is not None else loss_sum(model, batch, selective)
            total += float(s)
            count += n
    model.train()
    return total, count
