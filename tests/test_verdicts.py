"""Verdicts that hold up: comparison in bounded memory, accuracy flags only where the rows support them."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.core.compare import compare_logits, compare_to_summary, top_k_summary
from runtime.thresholds import flags_for, paired_difference_interval, wilson_interval


def peaked_logits(rng: np.random.Generator, n: int, v: int, scale: float) -> np.ndarray:
    return (rng.standard_normal((n, v)) * scale).astype(np.float32)


@pytest.mark.parametrize("scale, noise, tight", [(4.0, 0.05, True), (4.0, 0.5, True), (2.0, 1.0, False)])
def test_top_k_summary_gives_exact_top1_and_a_tight_lower_bound_of_kl(scale, noise, tight):
    """Tight where the top 64 tokens hold nearly all the mass (as for a language model's next token);
    a flat distribution over 5000 tokens still gets a lower bound."""
    rng = np.random.default_rng(0)
    ref = peaked_logits(rng, 300, 5000, scale)
    other = ref + rng.standard_normal(ref.shape).astype(np.float32) * noise
    full = compare_logits(ref, other)
    ids, lp = top_k_summary(ref)
    assert ids.shape == lp.shape == (300, 64) and ids.dtype == np.int32
    got = compare_to_summary(ids, lp, other)
    assert got["top1_agreement"] == full["top1_agreement"]
    assert got["mean_kl"] <= full["mean_kl"] + 1e-9  # grouping the tail never raises KL
    if tight:
        assert got["mean_kl"] >= 0.9 * full["mean_kl"]
    # the summary is 8 bytes per kept token: 300 positions x 64 = 150 KiB against 5.7 MiB of logits
    assert ids.nbytes + lp.nbytes < ref.nbytes / 30


def test_identical_distributions_compare_as_equal():
    ref = peaked_logits(np.random.default_rng(1), 50, 1000, 3.0)
    m = compare_to_summary(*top_k_summary(ref), ref.copy())
    assert m["top1_agreement"] == 1.0 and m["mean_kl"] < 1e-9 and m["max_abs_logprob_diff"] < 1e-5


def test_accuracy_drop_is_flagged_only_when_the_interval_supports_it():
    entry = {"kind": "gguf", "precision": "q4_k_m", "top1_agreement": 0.99}
    ref_hits = [True] * 60 + [False] * 4  # reference 0.9375 on 64 rows
    small = [True] * 58 + [False] * 6  # two answers fewer: -3.1 points
    diff = paired_difference_interval(small, ref_hits)
    assert diff["low"] < 0 < diff["high"] or diff["high"] == 0
    assert flags_for({**entry, "task_accuracy": 58 / 64}, 60 / 64, accuracy_diff=diff) == []
    large = [True] * 40 + [False] * 24  # twenty answers fewer
    diff = paired_difference_interval(large, ref_hits)
    assert diff["high"] < 0
    (flag,) = flags_for({**entry, "task_accuracy": 40 / 64}, 60 / 64, accuracy_diff=diff)
    assert flag.startswith("task accuracy 0.6250 < reference 0.938") and "95% interval" in flag
    # without an interval (no per-row answers) the plain margin applies, as before
    assert flags_for({**entry, "task_accuracy": 58 / 64}, 60 / 64)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
