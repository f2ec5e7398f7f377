"""Agreement between next-token distributions (numpy only).

Both inputs are logits of shape (N, V): N positions, V vocabulary entries, the reference
first. KL is KL(reference || other) in nats, averaged over positions.
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

