"""Fine-tuning: ``train(cfg)`` runs the recipe (``recipe.py``: setup -> train loop -> save).

The parts, each usable alone: ``prepare`` (inputs checked before weights load), ``model`` (device,
base model, PEFT wrapping), ``batches`` (batch stream, collation, loss), ``optim`` (optimizer and
schedule), ``loop`` (steps, evaluation, early stopping), ``checkpoint`` (resume, metrics, final
save) and ``record`` (``edgeft-run.json``); ``distributed`` (several processes, data parallel through
DDP), ``sharding`` (``--sharding fsdp``: weights sharded through FSDP2) and ``launch`` (``--num-processes``,
``--nnodes``: torchrun started for the user).
"""

from __future__ import annotations

from edgeft.train.batches import Batches, collate, loss_sum
from edgeft.train.checkpoint import (CKPT_DIR, METRICS_FILE, latest_checkpoint, load_checkpoint, read_metrics,
                                     save_checkpoint, trainable_state)
from edgeft.train.loop import evaluate
from edgeft.train.model import SELECTIVE_HEAD_TYPES, check_bitsandbytes, cpu_has_fast_bf16, load_model, pick_device
from edgeft.train.optim import build_optimizer, build_scheduler
from edgeft.train.prepare import Prepared, prepare_inputs
from edgeft.train.recipe import CURVES_FILE, TrainResult, train
from edgeft.train.record import RUN_RECORD, device_info, peak_memory_mb, versions

_prepare = prepare_inputs  # the name the tests use

__all__ = [
    "CKPT_DIR", "CURVES_FILE", "METRICS_FILE", "RUN_RECORD", "SELECTIVE_HEAD_TYPES", "Batches", "Prepared",
    "TrainResult", "build_optimizer", "build_scheduler", "check_bitsandbytes", "collate", "cpu_has_fast_bf16",
    "device_info", "evaluate", "latest_checkpoint", "load_checkpoint", "load_model", "loss_sum", "peak_memory_mb",
    "pick_device", "prepare_inputs", "read_metrics", "save_checkpoint", "train", "trainable_state", "versions",
]
