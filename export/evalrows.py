"""The user's evaluation rows in export verification: the reference side, computed once per export.

An exported artifact is judged on the rows it will serve when they are known (the pipeline's
evaluation data, or ``--eval-data``): teacher-forced agreement on the positions that depend on
each row (from its last user turn on, as the bench compares them) and the task accuracy of greedy
answers against the rows' own answers, both beside the merged PyTorch model's. Rows are
tokenised by the bench's own code (``runtime.bench.evalset``), so export and bench agree on
what a row is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

MAX_ROWS = 256  # rows an export is verified on
AUTO_MAX_ROWS = 1000  # rows each candidate of an auto search is judged on (its choice rests on them)
ANSWER_TOKENS = 16
MAX_DROP = 0.01  # task accuracy points (fraction) an artifact may lose where the rows prove it


@dataclass
class ReferenceAnswers:
    """The merged model on the evaluation rows: per-row compared logits' top-K, answers and hits."""

    evals: Any  # runtime.bench.evalset.EvalSet
    summaries: list[tuple[np.ndarray, np.ndarray]]
    answers: list[list[int]]
    hits: list[bool]


def load_eval_rows(path: str | Path, tokenizer: Any, *, max_rows: int = MAX_ROWS) -> Any:
    """The first ``max_rows`` rows of ``path`` as the bench tokenises them (one-line errors for bad rows)."""
    from runtime.bench.evalset import eval_set

    return eval_set(tokenizer, Path(path), max_rows, ANSWER_TOKENS)


_CACHE: dict[tuple[Any, ...], ReferenceAnswers] = {}


def reference_answers(model: Any, tokenizer: Any, evals: Any, *, model_dir: Path | None = None) -> ReferenceAnswers:
    """Run the merged PyTorch ``model`` over every evaluation row once (once per process for the same
    ``model_dir`` files and rows: ``--type auto`` verifies several candidates against it)."""
    key = _cache_key(model_dir, evals) if model_dir is not None else None
    if key in _CACHE:
        return _CACHE[key]

    summaries = reference_summaries(evals.rows, lambda row: torch_compared_logits(model, row))
    answers = [_torch_greedy(model, row.ids[: row.prompt_len], evals.stop_ids) for row in evals.rows]
    ref = ReferenceAnswers(evals, summaries, answers, grade(answers, evals, tokenizer))
    if key is not None:
        _CACHE[key] = ref
    return ref


def _cache_key(model_dir: Path, evals: Any) -> tuple[Any, ...]:
    """The model's weight files (name, size, mtime) and the rows' token ids."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(model_dir).glob("*.safetensors"))
    return (str(Path(model_dir).resolve()), tuple(files), tuple(tuple(r.ids) for r in evals.rows))


def compare_on_rows(ref: ReferenceAnswers, tokenizer: Any, logits_of: Callable[[list[int]], np.ndarray],
                    next_token: Callable[[list[int]], int]) -> dict[str, Any]:
    """Agreement and task accuracy of an artifact (``logits_of`` whole sequences, ``next_token`` for greedy)."""
    from runtime.thresholds import paired_difference_interval

    agreement = agreement_on_rows(ref.evals.rows, ref.summaries,
                                  lambda row: logits_of(row.ids)[row.compare_from: len(row.ids) - 1])
    answers = [_greedy(next_token, row.ids[: row.prompt_len], ref.evals.stop_ids) for row in ref.evals.rows]
    hits = grade(answers, ref.evals, tokenizer)
    diff = paired_difference_interval(hits, ref.hits)
    return {
        "data": str(ref.evals.path), "rows": len(hits), **agreement,
        "task_accuracy": sum(hits) / len(hits), "reference_task_accuracy": sum(ref.hits) / len(ref.hits),
        "task_accuracy_diff": diff,
        # the drop the rows support at 95%: how far the paired interval's upper end lies below zero
        "supported_drop": max(0.0, -diff["high"]),
        "answer_agreement": sum(a == b for a, b in zip(answers, ref.answers)) / len(answers),
    }


def torch_compared_logits(model: Any, row: Any) -> np.ndarray:
    """A PyTorch causal LM's logits at ``row``'s compared positions (``compare_from`` up to the last token's,
    which predicts past the row), as float32 numpy (positions, vocabulary)."""
    import torch

    keep = len(row.ids) - row.compare_from  # the compared positions, and the last, dropped below
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([row.ids]), logits_to_keep=keep).logits[0]
    return logits[:-1].float().numpy()


def reference_summaries(rows: list[Any], logits_of: Callable[[Any], np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The reference side of a comparison: the top-K summary of ``logits_of(row)`` (its compared positions)
    for each row, as the bench keeps it (``edgeft.core.compare.top_k_summary``)."""
    from edgeft.core.compare import top_k_summary

    return [top_k_summary(logits_of(row)) for row in rows]


def agreement_on_rows(rows: list[Any], summaries: list[tuple[np.ndarray, np.ndarray]],
                      logits_of: Callable[[Any], np.ndarray]) -> dict[str, Any]:
    """Top-1 agreement and mean KL(reference || other) over every compared position of ``rows``, the other
    side's logits from ``logits_of(row)`` (the same positions as the summaries')."""
    from edgeft.core.compare import compare_to_summary

    top1 = kl = 0.0
    n = 0
    for row, (ids, lp) in zip(rows, summaries):
        if not len(ids):
            continue  # a row with nothing to compare
        m = compare_to_summary(ids, lp, logits_of(row))
        top1, kl, n = top1 + m["top1_agreement"] * m["positions"], kl + m["mean_kl"] * m["positions"], n + m["positions"]
    return {"positions": n, "top1_agreement": top1 / n if n else float("nan"),
            "mean_kl": kl / n if n else float("nan")}


def grade(answers: list[list[int]], evals: Any, tokenizer: Any) -> list[bool]:
    """Whether each greedy answer equals its row's answer once both are normalised."""
    from edgeft.core.answers import normalise_answer

    texts = [tokenizer.decode([t for t in a if t not in evals.stop_ids], skip_special_tokens=True) for a in answers]
    return [normalise_answer(t) == normalise_answer(r.answer) for t, r in zip(texts, evals.rows)]


def _greedy(next_token: Callable[[list[int]], int], prompt: list[int], stop: list[int]) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(ANSWER_TOKENS):
        t = next_token(ids)
        out.append(t)
        if t in stop:
            break
        ids.append(t)
    return out


def _torch_greedy(model: Any, prompt: list[int], stop: list[int]) -> list[int]:
    """``_greedy`` with transformers' cached generation: the answer tokens, the stop token included."""
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS, do_sample=False,
                             eos_token_id=list(stop), pad_token_id=stop[0], top_p=None, top_k=None, temperature=None)
    return out[0, len(prompt):].tolist()
