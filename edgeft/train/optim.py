"""Optimization: parameter groups (weight decay, layer-wise and LoRA+ learning rates), the optimizer
(AdamW or a bitsandbytes 8-bit/paged variant), the learning-rate schedule, and the update that ends
each optimizer step.

New schedules, per-layer learning rates or a distributed wrapper belong here, so the training loop
does not change with them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from edgeft.config import TrainConfig, parse_milestones

# ``--lr-scheduler`` value -> transformers' scheduler name (each with linear warmup).
HF_SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
# Decoder blocks are ``...layers.<i>.`` (Llama, Qwen, Gemma, Phi, Mistral) or ``...h.<i>.`` (GPT-2 style).
_BLOCK = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
EXPONENTIAL_FINAL_FRACTION = 0.1  # default --lr-gamma of exponential: 10% of --lr at the last step
STEP_GAMMA = 0.1  # default --lr-gamma of step
STEP_MILESTONE_FRACTIONS = (0.5, 0.75)  # default --lr-milestones of step, as fractions of the steps


def lr_scale(name: str, n_blocks: int, cfg: TrainConfig) -> float:
    """The multiple of ``--lr`` a parameter trains at: ``layer_lr_decay ** (blocks above it)`` (the last
    block 1, embeddings below the first block ``decay ** n_blocks``, the final norm and head 1), times
    ``loraplus_lr_ratio`` for LoRA B matrices."""
    scale = 1.0
    if cfg.layer_lr_decay != 1.0 and n_blocks:
        block = _BLOCK.search(name)
        if block is not None:
            scale = cfg.layer_lr_decay ** (n_blocks - 1 - int(block.group(1)))
        elif "embed" in name or "wte" in name or "wpe" in name:
            scale = cfg.layer_lr_decay ** n_blocks
    if ".lora_B." in name or name.endswith("lora_B"):
        scale *= cfg.loraplus_lr_ratio
    return scale


def param_groups(cfg: TrainConfig, params: list, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Weight decay on matrices only (biases and norm weights, 1-d, are not decayed); with ``names``,
    one group per distinct learning rate too (``lr_scale``). Groups keep the order parameters come in."""
    names = names or [""] * len(params)
    n_blocks = 1 + max((int(m.group(1)) for m in map(_BLOCK.search, names) if m), default=-1)
    groups: dict[tuple[bool, float], list] = {}
    for name, p in zip(names, params):
        groups.setdefault((p.ndim >= 2, lr_scale(name, n_blocks, cfg)), []).append(p)
    ordered = sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))  # matrices first, then by rate
    return [{"params": ps, "weight_decay": cfg.weight_decay if matrix else 0.0, "lr": cfg.lr * scale}
            for (matrix, scale), ps in ordered]


def build_optimizer(cfg: TrainConfig, params: list, names: list[str] | None = None) -> Any:
    """The ``--optimizer`` over ``params`` (the trainable parameters, ``names`` their names) at ``--lr``
    scaled per group."""
    import torch

    groups = param_groups(cfg, params, names)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    import bitsandbytes as bnb

    cls = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
           "adamw_8bit": bnb.optim.AdamW8bit}[cfg.optimizer]
    return cls(groups, lr=cfg.lr)


def decay_factor(cfg: TrainConfig, warmup: int, total_steps: int) -> Callable[[int], float]:
    """Step -> multiple of each group's rate for ``exponential`` and ``step``, with linear warm-up."""
    span = max(1, total_steps - warmup)
    if cfg.lr_scheduler == "exponential":
        last = max(1, total_steps - 1 - warmup)  # decay steps before the last optimizer step
        gamma = cfg.lr_gamma if cfg.lr_gamma is not None else EXPONENTIAL_FINAL_FRACTION ** (1 / last)

        def after_warmup(k: int) -> float:
            return gamma ** k
    else:
        gamma = cfg.lr_gamma if cfg.lr_gamma is not None else STEP_GAMMA
        milestones = parse_milestones(cfg.lr_milestones) or [warmup + round(f * span) for f in STEP_MILESTONE_FRACTIONS]

        def after_warmup(k: int) -> float:
            if cfg.lr_step_size:
                return gamma ** (k // cfg.lr_step_size)
            return gamma ** sum(1 for m in milestones if warmup + k >= m)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)  # the same warm-up as transformers' schedules
        return after_warmup(step - warmup)

    return factor


def build_scheduler(cfg: TrainConfig, optimizer: Any, total_steps: int) -> Any:
    """The ``--lr-scheduler`` over ``total_steps``, after ``--warmup-steps`` (or ``--warmup-ratio``)."""
    warmup = cfg.warmup_steps or int(math.ceil(cfg.warmup_ratio * total_steps))
    if cfg.lr_scheduler in ("exponential", "step"):
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, decay_factor(cfg, warmup, total_steps))
    from transformers import get_scheduler

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
