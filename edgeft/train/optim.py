"""Optimization: parameter groups, the optimizer (AdamW or a bitsandbytes 8-bit/paged variant), the
learning-rate schedule, and the update that ends each optimizer step.

New schedules, per-layer learning rates or a distributed wrapper belong here, so the training loop
does not change with them.
"""

from __future__ import annotations

import math
from typing import Any

from edgeft.config import TrainConfig

# ``--lr-scheduler`` value -> transformers' scheduler name (each with linear warmup).
HF_SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def param_groups(cfg: TrainConfig, params: list) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases and norm weights (1-d) are not decayed."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: TrainConfig, params: list) -> Any:
    """The ``--optimizer`` over ``params`` (the trainable parameters) at ``--lr``."""
    import torch

    groups = param_groups(cfg, params)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
           "adamw_8bit": bnb.optim.AdamW8bit}[cfg.optimizer]
    return cls(groups, lr=cfg.lr)


def build_scheduler(cfg: TrainConfig, optimizer: Any, total_steps: int) -> Any:
    """The ``--lr-scheduler`` over ``total_steps``, after ``--warmup-steps`` (or ``--warmup-ratio``)."""
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))
    return get_scheduler(HF_SCHEDULER_NAMES[cfg.lr_scheduler], optimizer=optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


def apply_update(cfg: TrainConfig, params: list, optimizer: Any, scheduler: Any) -> None:
    """End an optimizer step: clip the accumulated gradients, update, advance the schedule,
    clear the gradients."""
    import torch

    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
