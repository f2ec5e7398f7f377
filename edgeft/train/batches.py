"""Tokenized examples to loss: the deterministic micro-batch stream, padding into tensors, and the
summed cross-entropy over response tokens (projecting only those positions where the model allows).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from edgeft.config import TrainConfig, parse_task_weights
from edgeft.data import IGNORE_INDEX, Tokenized, pack
from edgeft.train.mixing import TaskMix


class Batches:
    """Deterministic micro-batch stream: epoch ``e`` is a function of (seed, e) alone.

    Units (rows, or packs of rows) are shuffled, grouped by length within windows of
    ``32 x batch_size`` so a batch pads little, and the batch order is shuffled again. With a
    ``TaskMix`` (``--task-weights``) the epoch's units are its weighted draw instead of a permutation.
    """

    def __init__(self, units: list[list[Tokenized]], batch_size: int, seed: int, mix: TaskMix | None = None):
        self.units, self.batch_size, self.seed, self.mix = units, batch_size, seed, mix
        self.per_epoch = math.ceil(len(units) / batch_size)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        perm = self.mix.draw(g) if self.mix is not None else torch.randperm(len(self.units), generator=g).tolist()
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


def plan_batches(cfg: TrainConfig, train_examples: list[Tokenized], processes: int = 1) -> tuple[Batches, int]:
    """The training stream (rows packed when ``--packing``) and the number of optimizer steps. With
    several processes a micro-batch holds ``batch_size x processes`` units, which the ranks share."""
    units = pack(train_examples, cfg.max_seq_len) if cfg.packing else [[ex] for ex in train_examples]
    mix = None
    if cfg.task_weights:  # never with --packing (config validation): one unit is one row
        mix = TaskMix.for_examples(train_examples, parse_task_weights(cfg.task_weights), cfg.data)
    batches = Batches(units, cfg.batch_size * processes, cfg.seed, mix)
    steps_per_epoch = math.ceil(batches.per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return batches, total_steps


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


def n_targets(unit: list[Tokenized]) -> int:
    """Target tokens of a unit (labels are shifted by one: the first position never counts)."""
    return sum(sum(1 for t in ex.labels[1:] if t != IGNORE_INDEX) for ex in unit)


def n_tokens(batch: list[list[Tokenized]]) -> int:
    """Tokens of a micro-batch, padding not counted."""
    return sum(len(ex.input_ids) for unit in batch for ex in unit)
