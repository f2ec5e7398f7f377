"""Training data as token ids: rows rendered through the chat template, response-only labels, packing.

Rows are read and checked by ``edgeft.core.rows`` (shared with the runtime). Chat rows (and
instruction rows, rendered as a one-turn chat) go through the tokenizer's chat template; only
assistant tokens (including the end-of-turn token) carry loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgeft.core.rows import FALLBACK_CHAT_TEMPLATE, Row

IGNORE_INDEX = -100

@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    line: int
    task: str | None = None  # the row's ``task`` field

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class TokenStats:
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    loss_tokens: int = 0


def _chat_template(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates ("default", "tool_use", ...): chat rows use the default
        template = template.get("default")
    return template or FALLBACK_CHAT_TEMPLATE


def _render(tokenizer: Any, messages: list[dict[str, str]], gen_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=gen_prompt, chat_template=_chat_template(tokenizer)
    )


def _chat_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the character spans of every assistant turn (with its end-of-turn)."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], True)) if i else 0
        end = len(_render(tokenizer, messages[: i + 1], False))
        # Templates that are not prefix-stable fall back to locating the content itself.
        if full[:end] != _render(tokenizer, messages[: i + 1], False):
            pos = full.find(m["content"], spans[-1][1] if spans else 0)
            start, end = pos, pos + len(m["content"])
        spans.append((start, end))
    return full, spans


def _encode_with_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tid, (s, e) in zip(ids, offsets):
        inside = any(a <= s < b or (s == e and a < s <= b) for a, b in spans) and e > s
        labels.append(tid if inside else IGNORE_INDEX)
    return ids, labels


def tokenize_row(tokenizer: Any, row: Row) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX outside the response) of one row, untruncated."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if row.messages is not None:
        text, spans = _chat_spans(tokenizer, row.messages)
        ids, labels = _encode_with_spans(tokenizer, text, spans)
        return ids, labels
    if row.prompt is not None:
        p = bos + tokenizer(row.prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(row.completion, add_special_tokens=False)["input_ids"] + eos
        return p + c, [IGNORE_INDEX] * len(p) + c
    ids = bos + tokenizer(row.text, add_special_tokens=False)["input_ids"] + eos
    return ids, list(ids)


def tokenize_rows(tokenizer: Any, rows: list[Row], max_seq_len: int) -> tuple[list[Tokenized], TokenStats]:
    """Tokenise, truncate to ``max_seq_len`` (counted), drop rows left without target tokens."""
    out, st = [], TokenStats()
    for row in rows:
        ids, labels = tokenize_row(tokenizer, row)
        if len(ids) > max_seq_len:
            st.truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        ex = Tokenized(ids, labels, row.line, row.task)
        # Labels are shifted by one in the loss: the first token can never be a target.
        if sum(1 for t in labels[1:] if t != IGNORE_INDEX) == 0:
            st.dropped_no_target += 1
            continue
        out.append(ex)
        st.tokens += len(ids)
        st.loss_tokens += ex.n_loss_tokens
    st.examples = len(out)
    return out, st


def split_eval(examples: list[Tokenized], fraction: float, seed: int) -> tuple[list[Tokenized], list[Tokenized]]:
    """Deterministic held-out split (at least one eval row when fraction > 0 and rows allow)."""
    import random

    if fraction <= 0 or len(examples) < 2:
        return examples, []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, math.floor(len(examples) * fraction))
    held = set(idx[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def pack(examples: list[Tokenized], max_seq_len: int) -> list[list[Tokenized]]:
    """Greedy first-fit packing of whole rows into sequences of at most ``max_seq_len`` tokens."""
    bins: list[list[Tokenized]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(ex.input_ids)
        for i, r in enumerate(room):
            if r >= n:
                bins[i].append(ex)
                room[i] -= n
                break
        else:
            bins.append([ex])
            room.append(max_seq_len - n)
    return bins
