"""Sharded data parallel (``--sharding fsdp``) through PyTorch's FSDP2 (``fully_shard``): every decoder
layer, then the whole model, sharded over the processes, so each holds 1/P of the weights, gradients
and optimizer state; and the full (unsharded) weights and optimizer state that checkpoints and the
final save gather, so the files are those one process writes and any number of processes resumes.

bitsandbytes' 4-bit weights stay out of the shards (``ignored_params``): each process keeps the whole
frozen 4-bit base, as with DDP, and the LoRA weights and the 16/32-bit layers are sharded. FSDP2 turns
each parameter it shards into a plain DTensor, and a packed 4-bit weight would lose its quantization
state on the way.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

from edgeft.config import TrainConfig
from edgeft.train.distributed import Replicas, World, launched_world, step_loss_module


def shards_model(cfg: TrainConfig) -> bool:
    """Whether this process will shard its model: ``--sharding fsdp`` in a run of several processes
    (one process trains the plain model, whatever ``--sharding`` says)."""
    return cfg.sharding == "fsdp" and launched_world().distributed


def make_replicas(cfg: TrainConfig, model: Any, selective: bool, world: World, device: str) -> Any:
    """The loss of a micro-batch on this rank: through FSDP (the model is sharded in place, so build
    the optimizer after this) or through DDP / plainly (``Replicas``)."""
    if cfg.sharding == "fsdp" and world.distributed:
        return ShardedReplicas(model, selective, world, device)
    return Replicas(model, selective, world, device)


class ShardedReplicas:
    """The loss of a micro-batch on this rank, with the model sharded by FSDP2. Gradients are
    reduce-scattered (averaged over ranks) after every micro-batch, so they stay sharded during
    accumulation; the sum over micro-batches is the same as DDP's."""

    sharded = True

    def __init__(self, model: Any, selective: bool, world: World, device: str):
        self.model = model
        self.root = shard_model(model, selective, world, device)

    def loss(self, batch: dict[str, Any]) -> Any:
        """Summed cross-entropy over the target tokens of ``batch`` (a scalar tensor)."""
        return self.root(batch)[0]

    def sums(self, batch: dict[str, Any]) -> tuple[Any, int]:
        """(summed cross-entropy, target tokens) of ``batch``; every rank must call it (it gathers weights)."""
        out = self.root(batch)
        # Without a backward the root keeps its weights gathered; shard them again, so weights read or
        # restored after an evaluation (checkpoint, early stopping) are the sharded ones.
        self.root.reshard()
        return out

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def decoder_layers(model: Any) -> list[Any]:
    """The model's repeated blocks: the classes transformers keeps whole on one device (``_no_split_modules``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: Any, selective: bool, world: World, device: str) -> Any:
    """Shard ``model`` in place with ``fully_shard``, one group per decoder layer and one for the rest
    (embeddings, final norm, output head: tied weights stay in one group); returns the root, a module
    whose forward is the loss of a batch (``step_loss_module``), as the loop and evaluation call it.
    Parameters move to ``device`` shard by shard, so a CUDA run may load the model on the CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world.size,))
    four_bit = {p for p in model.parameters() if type(p).__name__ == "Params4bit"}
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=four_bit)
    return fully_shard(step_loss_module(model, selective), mesh=mesh, ignored_params=four_bit)


def _dtensor_type() -> type | None:
    import torch.distributed as dist

    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def full_copies(named: Iterable[tuple[str, Any]], keep: bool = True) -> dict[str, Any]:
    """CPU copies of the tensors ``named`` yields, sharded ones gathered from every rank (so every rank
    must call this, with the same names in the same order). A tensor that appears under two names
    (tied weights) is gathered once and stays one tensor. ``keep`` False takes part and returns {}."""
    dtensor = _dtensor_type()
    by_id: dict[int, Any] = {}
    out: dict[str, Any] = {}
    for name, t in named:
        if id(t) not in by_id:
            data = t.detach()
            full = data.full_tensor() if dtensor is not None and isinstance(data, dtensor) else data
            by_id[id(t)] = full.to("cpu").clone().contiguous() if keep else None
        if keep:
            out[name] = by_id[id(t)]
    return out


def full_model_state(model: Any, keep: bool = True) -> dict[str, Any]:
    """The whole state dict of ``model`` unsharded, as ``save_pretrained(state_dict=...)`` takes it."""
    return full_copies(model.state_dict(keep_vars=True).items(), keep)


def full_optimizer_state(optimizer: Any, keep: bool = True) -> dict[str, Any]:
    """``optimizer.state_dict()`` with sharded moments gathered to full CPU tensors: the same file a
    one-process run writes (every rank must call this)."""
    sd = optimizer.state_dict()  # its per-weight dicts are the optimizer's own: replaced, not changed
    for pid in sorted(sd["state"]):
        gathered = full_copies(sorted(sd["state"][pid].items()), keep)
        sd["state"][pid] = gathered
    return sd if keep else {}


def local_part(full: Any, like: Any) -> Any:
    """``full`` (a whole tensor) as ``like`` holds it: this rank's shard when ``like`` is sharded."""
    dtensor = _dtensor_type()
    full = full.to(like.device)
    if dtensor is None or not isinstance(like, dtensor):
        return full
    from torch.distributed.tensor import distribute_tensor

    # Every rank read the same file: each takes its own shard, nothing is sent.
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer_state(optimizer: Any) -> None:
    """After ``optimizer.load_state_dict`` of a full state: each moment of a sharded weight becomes this
    rank's shard of it (a no-op without sharded weights)."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            moments = optimizer.state.get(p, {})
            for key, value in moments.items():
                if isinstance(p, dtensor) and not isinstance(value, dtensor) and value.shape == p.shape:
                    moments[key] = local_part(value, p)
