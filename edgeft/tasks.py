"""A small built-in task, generated deterministically, that fine-tuning visibly improves.

Short product reviews built from templates; the answer names the product and the sentiment in a
fixed form, ``<product>, <positive|negative>`` (e.g. ``coffee maker, negative``). An instruct
model asked zero-shot answers in its own words, so exact match of the normalised answer is low
before fine-tuning; after a few dozen QLoRA steps it is high.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

INSTRUCTION = "Name the product and the sentiment (positive or negative) of this review."
_ITEMS = ["phone", "laptop", "coffee maker", "backpack", "headset", "blender", "keyboard", "tent", "jacket", "lamp",
          "printer", "camera", "watch", "kettle", "chair", "speaker", "monitor", "bicycle", "vacuum", "router"]
_POS = ["excellent", "reliable", "sturdy", "delightful", "fast", "comfortable", "brilliant", "well made", "quiet", "superb"]
_NEG = ["flimsy", "useless", "noisy", "disappointing", "slow", "uncomfortable", "broken", "overpriced", "awful", "unreliable"]
_TEMPLATES = [
    "The {item} is {adj}.",
    "I bought this {item} last month and it is {adj}.",
    "Honestly, a {adj} {item}. {coda}",
    "My {item} arrived yesterday: {adj}, {adj2} and exactly as I {expect}.",
    "After a week of use the {item} feels {adj}.",
]
_CODA = {True: ["Would buy again.", "Highly recommended.", "Five stars."], False: ["Returning it.", "Avoid.", "One star."]}
_EXPECT = {True: "hoped", False: "feared"}


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = _POS if positive else _NEG
        adj, adj2 = rng.sample(words, 2)
        review = rng.choice(_TEMPLATES).format(item="{item}", adj=adj, adj2=adj2,
                                               coda=rng.choice(_CODA[positive]), expect=_EXPECT[positive])
        item = rng.choice(_ITEMS)
        review = review.replace("{item}", item)
        rows.append({"instruction": INSTRUCTION, "input": review,
                     "output": f"{item}, {'positive' if positive else 'negative'}"})
    return rows


def write_task(directory: Path, n_train: int = 320, n_eval: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (disjoint seeds) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, s in (("train.jsonl", n_train, seed), ("eval.jsonl", n_eval, seed + 1)):
        p = directory / name
        p.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, s)))
        paths.append(p)
    return paths[0], paths[1]
