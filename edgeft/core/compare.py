"""Agreement between next-token distributions (numpy only).

Both inputs are logits of shape (N, V): N positions, V vocabulary entries, the reference
first. KL is KL(reference || other) in nats, averaged over positions.

For evaluation sets too large to keep the reference's logits, ``top_k_summary`` keeps the
reference's K most likely tokens per position with their log-probabilities, and
``compare_to_summary`` compares another model's logits with that: top-1 agreement is exact;
KL is computed over those K tokens plus the rest of the vocabulary as one bucket, which is a
lower bound of the full KL (grouping outcomes never increases KL) that differs from it by the
rest's own divergence, a term below 1e-4 nats when the K tokens hold all but 1e-3 of the mass.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement, mean/max KL and max |diff| between two (N, V) logit arrays."""
    if ref.shape != other.shape:
        v = min(ref.shape[-1], other.shape[-1])
        if ref.shape[0] != other.shape[0]:
            raise ValueError(f"position count differs: {ref.shape} vs {other.shape}")
        # Vocabularies padded to a multiple (ONNX/GGUF sometimes pad): compare the common part.
        ref, other = ref[:, :v], other[:, :v]
    lp, lq = log_softmax(ref), log_softmax(other)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    top1 = (ref.argmax(-1) == other.argmax(-1))
    return {
        "positions": int(ref.shape[0]),
        "top1_agreement": float(top1.mean()) if top1.size else float("nan"),
        "mean_kl": float(kl.mean()) if kl.size else float("nan"),
        "max_kl": float(kl.max()) if kl.size else float("nan"),
        "max_abs_diff": float(np.abs(ref.astype(np.float64) - other.astype(np.float64)).max()) if ref.size else 0.0,
    }


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean negative log-likelihood) of ``targets`` (N,) under ``logits`` (N, V)."""
    lp = log_softmax(logits)
    nll = -lp[np.arange(len(targets)), targets]
    return float(np.exp(nll.mean()))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (nats) of each of ``targets`` (N,) under ``logits`` (N, V)."""
    lp = log_softmax(logits)
    return -lp[np.arange(len(targets)), targets]



TOP_K = 64  # reference tokens kept per position by ``top_k_summary``


def top_k_summary(logits: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ``k`` most likely tokens per position, most likely first: (ids int32, log-probs float32), each (N, k)."""
    lp = log_softmax(logits)
    k = min(k, lp.shape[-1])
    part = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(lp, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(part, order, -1).astype(np.int32), np.take_along_axis(vals, order, -1).astype(np.float32)


def compare_to_summary(ids: np.ndarray, ref_lp: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement, mean/max KL(reference || other) and max |log-prob diff| over the reference's top K.

    ``ids``/``ref_lp`` come from ``top_k_summary`` of the reference; ``other`` is (N, V) logits.
    The tokens outside the top K form one bucket on each side (see the module docstring).
    """
    v = other.shape[-1]
    inside = ids < v  # vocabularies padded differently: a token past the other's end has probability 0 there
    lq = np.take_along_axis(log_softmax(other), np.where(inside, ids, 0).astype(np.int64), axis=-1)
    lq = np.where(inside, lq, np.log(1e-12))
    lp = ref_lp.astype(np.float64)
    p, q = np.exp(lp), np.exp(lq)
    rest_p = np.clip(1.0 - p.sum(-1), 1e-12, None)
    rest_q = np.clip(1.0 - q.sum(-1), 1e-12, None)
    kl = (p * (lp - lq)).sum(-1) + rest_p * (np.log(rest_p) - np.log(rest_q))
    kl = np.maximum(kl, 0.0)
    top1 = other.argmax(-1) == ids[:, 0]
    return {
        "positions": int(other.shape[0]),
        "top1_agreement": float(top1.mean()) if top1.size else float("nan"),
        "mean_kl": float(kl.mean()) if kl.size else float("nan"),
        "max_kl": float(kl.max()) if kl.size else float("nan"),
        "max_abs_logprob_diff": float(np.abs(lp - lq).max()) if lp.size else 0.0,
    }
