"""Data-parallel training over several processes through torch.distributed (DDP): the process group
that torchrun or ``accelerate launch`` set up, each rank's share of a micro-batch, the loss through
DDP (which all-reduces the gradients), sums agreed across ranks, and errors that end every rank.

The batch plan is the one-process plan at ``batch_size x processes`` rows per micro-batch; rank r
trains on rows r, r+P, ... of each, so P processes at batch b take the same steps as one process
at batch P x b. One process (no launcher) uses none of this: ``SINGLE`` and plain calls.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from edgeft.config import TrainConfig
from edgeft.core.errors import ConfigError, EdgeftError, one_line
from edgeft.train.batches import loss_sum

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank ``rank`` of ``size`` (``local_rank`` on this machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched_world() -> World:
    """The world torchrun / ``accelerate launch`` describe in the environment (``SINGLE`` without one)."""
    if not under_launcher():
        return SINGLE
    env = os.environ
    return World(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))


def under_launcher() -> bool:
    """Whether torchrun or ``accelerate launch`` started this process."""
    return "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Whether this process prints results (rank 0, or no launcher at all)."""
    return launched_world().main


def start_world(cfg: TrainConfig) -> World:
    """Join the process group when a launcher started this process (gloo on CPU, NCCL on CUDA, with
    ``--dist-timeout`` on every collective); ranks other than 0 go quiet."""
    world = launched_world()
    expected = cfg.num_processes * cfg.nnodes
    if expected > 1 and world.size != expected:
        raise ConfigError(f"--num-processes {cfg.num_processes} x --nnodes {cfg.nnodes}: the launcher started "
                          f"{world.size} processes; drop --num-processes and --nnodes when you launch with "
                          "torchrun or accelerate yourself")
    if not world.distributed:
        return world
    import torch
    import torch.distributed as dist

    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(world.local_rank)  # "cuda" now means this rank's GPU everywhere
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    if not world.main:
        from edgeft.core.progress import console

        console.quiet = True
    return world


def stop_world(world: World) -> None:
    """Leave the process group (a no-op for one process)."""
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard(world: World, units: list[T]) -> tuple[list[T], float]:
    """This rank's rows of a micro-batch (every ``size``-th from ``rank``) and the weight of their loss.
    A rank left with none (a short last batch) reruns the first row at weight 0, so its gradient
    all-reduce still happens."""
    mine = units[world.rank :: world.size]
    return (mine, 1.0) if mine else (units[:1], 0.0)


def _collective_device(world: World) -> Any:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(world: World, values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (``values`` itself for one process)."""
    if not world.distributed:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(world))
    dist.all_reduce(t)
    return t.tolist()


def all_gather(world: World, value: float) -> list[float]:
    """``value`` of every rank, in rank order."""
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def main_first(world: World, action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 only and hand its result to every rank; if it fails, every rank
    raises the same one-line error (so a bad ``--output`` or ``--resume`` never leaves ranks waiting)."""
    if not world.distributed:
        return action()
    import torch.distributed as dist

    box: list[Any] = [None]
    if world.main:
        try:
            box[0] = ("ok", action())
        except EdgeftError as e:
            box[0] = ("error", type(e), e.message)
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise box[0][1](box[0][2])
    return box[0][1]


def step_loss_module(model: Any, selective: bool) -> Any:
    """A module whose forward is ``loss_sum`` of a micro-batch (summed loss, target tokens), so DDP and
    FSDP see the forward they sync."""
    import torch

    class StepLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch: dict[str, Any]) -> tuple[Any, int]:
            return loss_sum(self.model, batch, selective)

    return StepLoss()


class Replicas:
    """The loss of a micro-batch on this rank. With several processes the model runs inside DDP, which
    averages the gradients over ranks in the backward of the step's last micro-batch."""

    sharded = False  # every rank holds whole weights (``sharding.ShardedReplicas``: shards)

    def __init__(self, model: Any, selective: bool, world: World, device: str):
        self.model, self.selective, self.world = model, selective, world
        self.ddp = None
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            broadcast_trainable(model)
            ids = [world.local_rank] if device.startswith("cuda") else None
            # Every rank built the same model; only the trainable weights are broadcast (above), not
            # the frozen (maybe 4-bit) base.
            self.ddp = DistributedDataParallel(step_loss_module(model, selective), device_ids=ids, init_sync=False)

    def loss(self, batch: dict[str, Any]) -> Any:
        """Summed cross-entropy over the target tokens of ``batch`` (a scalar tensor)."""
        if self.ddp is None:
            return loss_sum(self.model, batch, self.selective)[0]
        return self.ddp(batch)[0]

    def sums(self, batch: dict[str, Any]) -> tuple[Any, int]:
        """(summed cross-entropy, target tokens) of ``batch`` for evaluation (no gradient sync)."""
        return loss_sum(self.model, batch, self.selective)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients stay local until the last micro-batch of an optimizer step."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()


def broadcast_trainable(model: Any) -> None:
    """Copy rank 0's trainable weights to every rank."""
    import torch.distributed as dist

    for p in model.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src=0)


def reseed_per_rank(cfg: TrainConfig, world: World, step: int) -> None:
    """Dropout differs between ranks (each sees different rows); the initial weights do not."""
    if world.distributed:
        import torch

        torch.manual_seed(cfg.seed * 1000 + world.rank + 7919 * step)


@contextlib.contextmanager
def peers_lost_as_error(world: World, out: Path) -> Iterator[None]:
    """A collective that fails because another rank died or timed out becomes one line that says
    how to continue; one process passes errors through unchanged."""
    if not world.distributed:
        yield
        return
    import torch.distributed as dist

    resume = f"continue from the last checkpoint in {out / 'checkpoints'} with --resume"
    try:
        with _sigterm_as_error():
            yield
    except _LauncherStopped:
        # torchrun ends the other ranks with SIGTERM as soon as one of them dies, often before
        # they reach a collective that would have failed on their own.
        raise EdgeftError(f"rank {world.rank}: another process of this run stopped (the launcher sent SIGTERM); "
                          f"{resume}") from None
    except (dist.DistError, RuntimeError) as e:
        if isinstance(e, EdgeftError) or not _is_peer_failure(e):
            raise
        reason = re.sub(r"^\[[^\]]*\] ", "", one_line(e).split(": ", 1)[-1])  # without gloo's source path
        raise EdgeftError(f"rank {world.rank}: another process of this run stopped or timed out ({reason[:120]}); "
                          f"{resume}") from None


class _LauncherStopped(Exception):
    """SIGTERM from the launcher, raised where the rank happened to be."""


@contextlib.contextmanager
def _sigterm_as_error() -> Iterator[None]:
    """SIGTERM raises ``_LauncherStopped`` in the main thread while the block runs."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise _LauncherStopped()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_peer_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(
        w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket"))
