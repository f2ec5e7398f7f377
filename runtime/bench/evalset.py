"""Token ids every model is fed, all made once by the reference tokenizer: the check that each
artifact's tokenizer agrees with it, the evaluation rows (``eval_set``), the end-of-turn ids and
the latency prompt.

An evaluation row goes through the chat template; its logits are compared from the start of the
last user turn (a system prompt shared by every row would otherwise dominate the comparison and
the reference-logits file), and each distinct context once: a position whose tokens so far repeat
another row's (an instruction every row starts with) has the same logits there, so only one row
scores it. Counted once per row, one close call in a shared instruction moved top-1 by two points
on an 872-row set (a 47-position row: 1/47 of every row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeft.core.errors import DataError, EdgeftError
from runtime.artifacts import GGUF, Artifact
from runtime.bench.inputs import has_tokenizer, tokenizer_dir

if TYPE_CHECKING:
    from edgeft.core.rows import Row

MAX_COMPARED_PER_ROW = 512  # a longer row is compared on its last positions only

# Texts both tokenizers must encode identically (plain prose, code, numbers, accents, chat markup).
TOKENIZER_SAMPLES = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Prices rose 3.5% in 2024, said 12 café owners.",
)
TOKENIZER_CHAT_SAMPLE = [{"role": "user", "content": "Is this review positive or negative? Great value."},
                         {"role": "assistant", "content": "positive"}]
# Latency prompt: this text through the chat template, repeated as needed and cut to --prompt-tokens.
LATENCY_TEXT = (
    "Summarise the following notes for a colleague who missed the meeting. The team reviewed the quarterly "
    "plan, agreed to move the product launch by two weeks to finish accessibility testing, asked finance for "
    "a revised budget, and assigned owners for the documentation, the migration guide and the support rota."
)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def reference_tokenizer(reference: Artifact) -> Any:
    """The reference's Hugging Face tokenizer (the base model's, for an adapter without one)."""
    from runtime.modelfiles import load_tokenizer

    return load_tokenizer(str(tokenizer_dir(reference)))


def _chat(tok: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    from edgeft.core.rows import FALLBACK_CHAT_TEMPLATE

    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                   chat_template=tok.chat_template or FALLBACK_CHAT_TEMPLATE)


def tokenizer_samples(tok: Any) -> list[str]:
    """The texts every artifact's tokenizer must encode as the reference's does."""
    return [*TOKENIZER_SAMPLES, _chat(tok, TOKENIZER_CHAT_SAMPLE, generation_prompt=False)]


def check_tokenizers(tok: Any, reference: Artifact, artifacts: list[Artifact]) -> None:
    """Every artifact must turn the sample texts into the reference's token ids (one error for all)."""
    from runtime.backends import gguf_tokenize
    from runtime.modelfiles import load_tokenizer

    texts = tokenizer_samples(tok)
    want = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    problems = []
    for art in artifacts:
        if art.kind == GGUF:
            got = gguf_tokenize(art.path, texts)
            sizes_differ = False
        else:
            tdir = tokenizer_dir(art)
            if tdir is None or not has_tokenizer(tdir):
                continue  # nothing to compare: the run feeds the reference's ids regardless
            other = load_tokenizer(str(tdir))
            got = [list(other(t, add_special_tokens=False)["input_ids"]) for t in texts]
            sizes_differ = len(other) != len(tok)
        bad = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
        if bad or sizes_differ:
            where = f"sample {texts[bad[0]][:30]!r}" if bad else "vocabulary size"
            problems.append(f"tokenizer of --artifact {art.path} differs from the tokenizer of --reference "
                            f"{reference.path} ({where}); bench feeds the reference's token ids to every artifact, "
                            "so they must share one tokenizer")
    if problems:
        raise EdgeftError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Evaluation rows


@dataclass
class EvalRow:
    """One evaluation row as token ids, and the positions the workers score."""

    line: int
    ids: list[int]  # prompt + answer + end of turn
    prompt_len: int
    compare_from: int  # first position whose logits are compared (start of the last user turn)
    answer: str
    task: str | None = None  # the row's ``task`` field: its metrics are also reported per task

    def spec(self) -> dict[str, Any]:
        """The row as a worker spec holds it."""
        return {"ids": self.ids, "prompt_len": self.prompt_len, "compare_from": self.compare_from}


@dataclass
class EvalSet:
    """The tokenised evaluation rows and what generation stops at."""

    path: Path
    rows: list[EvalRow]
    stop_ids: list[int]
    answer_tokens: int
    total_rows: int  # rows in the file before --max-rows

    @property
    def positions(self) -> int:
        """Compared positions over all rows (rows of the reference-logits file)."""
        return sum(len(r.ids) - 1 - r.compare_from for r in self.rows)

    @property
    def max_tokens(self) -> int:
        """Longest sequence a worker sees: a whole row, or a prompt plus a greedy answer."""
        return max(max(len(r.ids), r.prompt_len + self.answer_tokens) for r in self.rows)


def eval_set(tok: Any, path: Path, max_rows: int | None, answer_tokens: int, model_dir: Path | None = None) -> EvalSet:
    """Tokenise the evaluation rows once, with the reference tokenizer (bad rows: file:line errors).

    ``model_dir`` is where the reference's generation_config.json (extra end-of-turn ids) lives.
    """
    from edgeft.core.rows import load_rows

    rows, _ = load_rows(path)
    total = len(rows)
    rows = rows[:max_rows] if max_rows else rows
    stop = stop_ids(tok, model_dir)
    if not stop:
        raise EdgeftError("--reference: its tokenizer has no end-of-sequence token, so answers could not stop")
    out = [_tokenise_row(tok, row, path, eos=stop[0]) for row in rows]
    _compare_each_context_once(out)
    return EvalSet(Path(path), out, stop, answer_tokens, total)


def _compare_each_context_once(rows: list[EvalRow]) -> None:
    """Move each row's ``compare_from`` past the prefix it shares with another row (the logits at
    position t depend on ids[:t+1] only), so every distinct context is scored by one row: the first
    of them in token order. Answer positions stay compared (every row keeps P-1 .. T-2).

    The longest prefix a row shares with any other row is the one it shares with its neighbour in
    sorted order, so sorting once finds them all."""
    order = sorted(range(len(rows)), key=lambda i: rows[i].ids)
    for prev, cur in zip(order, order[1:]):
        a, b = rows[prev].ids, rows[cur].ids
        shared = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        row = rows[cur]
        row.compare_from = max(row.compare_from, min(shared, row.prompt_len - 1))


def _tokenise_row(tok: Any, row: Row, path: Path, *, eos: int) -> EvalRow:
    """Prompt ids + answer ids + ``eos``, compared from the last user turn (at most the last
    MAX_COMPARED_PER_ROW positions, always every answer position P-1 .. T-2)."""
    if row.messages is not None:
        answer, prompt, compare_from = _chat_prompt(tok, row.messages)
    elif row.prompt is not None:
        answer, prompt, compare_from = row.completion or "", list(tok(row.prompt)["input_ids"]), 0
    else:
        raise DataError(f"{path}:{row.line}: a plain-text row has no reference answer; bench needs instruction, "
                        "chat or prompt/completion rows")
    answer_ids = list(tok(answer, add_special_tokens=False)["input_ids"]) + [eos]
    ids = prompt + answer_ids
    compare_from = max(compare_from, len(ids) - 1 - MAX_COMPARED_PER_ROW)
    compare_from = max(0, min(compare_from, len(prompt) - 1))
    return EvalRow(row.line, ids, len(prompt), compare_from, answer, row.task)


def _chat_prompt(tok: Any, messages: list[dict[str, str]]) -> tuple[str, list[int], int]:
    """(last assistant answer, ids of the turns before it + generation prompt, first token of the last user turn)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    answer = messages[last]["content"]
    text = _chat(tok, messages[:last], generation_prompt=True)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    prompt = list(enc["input_ids"])
    users = [m["content"] for m in messages[:last] if m["role"] == "user"]
    start = text.rfind(users[-1]) if users else -1
    compare_from = next((i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > start), 0) if start >= 0 else 0
    return answer, prompt, compare_from


def stop_ids(tok: Any, model_dir: Path | None = None) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS first, then generation_config's (chat models end turns with them)."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    path = Path(model_dir or "") / "generation_config.json"
    if model_dir is not None and path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except ValueError:
            eos = None
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def latency_prompt(tok: Any, n: int) -> list[int]:
    """Exactly ``n`` token ids: LATENCY_TEXT in a chat turn (repeated as needed), cut to length."""
    text = LATENCY_TEXT
    while True:
        ids = list(tok(_chat(tok, [{"role": "user", "content": text}], generation_prompt=True),
                       add_special_tokens=False)["input_ids"])
        if len(ids) >= n:
            return ids[:n]
        text = f"{text} {LATENCY_TEXT}"
