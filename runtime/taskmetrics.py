"""Task metrics of generated answers against reference answers, with bootstrap confidence intervals.

Answers drawn from a small label set are scored as classification (accuracy, per-class and macro
precision/recall/F1 and a confusion matrix, scikit-learn); other answers as free text (exact match,
BLEU from sacrebleu, ROUGE-L from rouge-score). Every figure gets a percentile bootstrap interval
over rows (scipy.stats.bootstrap). Answers are compared after ``normalise_answer``. The libraries are
imported inside the functions, so ``import runtime`` stays light.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edgeft.core.answers import normalise_answer

MAX_LABELS = 20  # references with at most this many distinct values (and repeats) form a label set
OTHER_LABEL = "(other)"  # a prediction outside the label set
CONFIDENCE = 0.95
RESAMPLES = 1000
NO_TASK = "(no task)"  # rows without a ``task`` field, beside rows that have one


def is_label_set(references: list[str]) -> bool:
    """Whether the normalised references look like class labels: at most ``MAX_LABELS`` distinct
    values, and on average each value answers at least two rows."""
    distinct = {normalise_answer(r) for r in references}
    return len(references) >= 2 and len(distinct) <= min(MAX_LABELS, len(references) / 2)


def bootstrap_ci(statistic: Callable[[np.ndarray], np.ndarray], n: int, *, confidence: float = CONFIDENCE,
                 resamples: int = RESAMPLES, seed: int = 0) -> list[tuple[float, float]]:
    """Percentile bootstrap intervals of each value of ``statistic(row_indices)`` over ``n`` rows."""
    import warnings

    from scipy.stats import bootstrap

    point = np.atleast_1d(statistic(np.arange(n)))
    if n < 2:
        return [(float(v), float(v)) for v in point]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples (one class) are expected, not news
        res = bootstrap((np.arange(n),), lambda idx: statistic(np.asarray(idx, dtype=int)), vectorized=False,
                        confidence_level=confidence, n_resamples=resamples, method="percentile", random_state=seed)
    lows, highs = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    return [(float(lo), float(hi)) if np.isfinite(lo) and np.isfinite(hi) else (float(v), float(v))
            for lo, hi, v in zip(lows, highs, point)]


def classification_metrics(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Accuracy, per-class and macro precision/recall/F1, and the confusion matrix (rows: reference,
    columns: prediction; predictions outside the label set count as ``OTHER_LABEL``)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    refs = [normalise_answer(r) for r in references]
    labels = sorted(set(refs))
    preds = [p if p in labels else OTHER_LABEL for p in (normalise_answer(x) for x in predictions)]
    precision, recall, f1, support = precision_recall_fscore_support(refs, preds, labels=labels, zero_division=0)
    columns = labels + ([OTHER_LABEL] if OTHER_LABEL in preds else [])
    return {
        "accuracy": float(accuracy_score(refs, preds)),
        "macro_precision": float(np.mean(precision)), "macro_recall": float(np.mean(recall)),
        "macro_f1": float(np.mean(f1)),
        "per_class": {lab: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for lab, p, r, f, s in zip(labels, precision, recall, f1, support)},
        "confusion": {"labels": columns, "matrix": confusion_matrix(refs, preds, labels=columns).tolist()},
    }


def rouge_l(predictions: list[str], references: list[str]) -> np.ndarray:
    """ROUGE-L F-measure of each prediction against its reference (rouge-score)."""
    import logging

    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs its tokenizer choice at INFO
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return np.array([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Exact match of normalised answers, corpus BLEU and mean ROUGE-L F."""
    exact = [normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references)]
    return {"exact_match": float(np.mean(exact)) if exact else float("nan"), "bleu": bleu(predictions, references),
            "rouge_l": float(np.mean(rouge_l(predictions, references))) if predictions else float("nan")}


def _classification_statistic(predictions: list[str], references: list[str]) -> tuple[list[str], Callable]:
    """Names, and a function of resampled row indices giving accuracy and macro precision/recall/F1
    over the full label set (labels are encoded once; scikit-learn computes each resample)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    refs = [normalise_answer(r) for r in references]
    labels = sorted(set(refs))
    code = {lab: i for i, lab in enumerate(labels)}
    ref_codes = np.array([code[r] for r in refs])
    pred_codes = np.array([code.get(normalise_answer(p), len(labels)) for p in predictions])

    def statistic(idx: np.ndarray) -> np.ndarray:
        r, p = ref_codes[idx], pred_codes[idx]
        prec, rec, f1, _ = precision_recall_fscore_support(r, p, labels=list(range(len(labels))), average="macro",
                                                           zero_division=0)
        return np.array([accuracy_score(r, p), prec, rec, f1])

    return ["accuracy", "macro_precision", "macro_recall", "macro_f1"], statistic


def _generation_statistic(predictions: list[str], references: list[str]) -> tuple[list[str], Callable]:
    """Names, and a function of resampled row indices giving exact match, BLEU and ROUGE-L."""
    preds, refs = np.array(predictions, dtype=object), np.array(references, dtype=object)
    exact = np.array([normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references)], float)
    rouge = rouge_l(predictions, references)

    def statistic(idx: np.ndarray) -> np.ndarray:
        return np.array([exact[idx].mean(), bleu(list(preds[idx]), list(refs[idx])), rouge[idx].mean()])

    return ["exact_match", "bleu", "rouge_l"], statistic


def task_metrics(predictions: list[str], references: list[str], *, resamples: int = RESAMPLES, seed: int = 0,
                 confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The metrics that fit the answers, each with a ``confidence`` bootstrap interval in ``ci``."""
    if not references:
        return {"kind": None, "rows": 0}
    kind = "classification" if is_label_set(references) else "generation"
    metrics = (classification_metrics if kind == "classification" else generation_metrics)(predictions, references)
    names, statistic = (_classification_statistic if kind == "classification" else _generation_statistic)(
        predictions, references)
    ci = dict(zip(names, bootstrap_ci(statistic, len(references), confidence=confidence, resamples=resamples,
                                      seed=seed)))
    return {"kind": kind, "rows": len(references), **metrics, "ci": ci,
            "ci_method": f"percentile bootstrap over rows, {resamples} resamples, {confidence:.0%}"}


def metrics_by_task(predictions: list[str], references: list[str], tasks: list[str | None],
                    **options: Any) -> dict[str, dict[str, Any]] | None:
    """``task_metrics`` of each task's rows on their own (each task gets its own kind: labels or free
    text), by task name; None when no row names a task. ``options`` go to ``task_metrics``."""
    if all(task is None for task in tasks):
        return None
    rows: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        rows.setdefault(NO_TASK if task is None else task, []).append(i)
    return {task: task_metrics([predictions[i] for i in idx], [references[i] for i in idx], **options)
            for task, idx in sorted(rows.items())}
