"""Latency of greedy generation, measured like llama-bench: warm up, repeat, report median and spread.

One run (``time_run``): reset the cache, prefill the prompt, pick the first token (time to
first token), then decode ``new_tokens - 1`` more tokens one at a time, never stopping at EOS
so every run does the same work. ``summarise`` turns the runs into the reported figures:

- ``ttft_s``: prefill + first argmax, median over runs;
- ``prompt_tokens_per_s``: prompt length / prefill time;
- ``decode_tokens_per_s``: decoded tokens / decode time (the first token belongs to the prefill);
- ``token_latency_p50_s`` / ``_p95_s``: percentiles of single decode steps over all runs;
- for each per-run figure, ``{name}_min`` / ``_max`` and ``{name}_spread`` = (max - min) / median.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from runtime.backends import Backend

# The default workload (batch 1), as in the issue: a 64-token prompt and 128 new tokens.
PROMPT_TOKENS = 64
NEW_TOKENS = 128
WARMUP = 1
REPEATS = 3


@dataclass
class RunTiming:
    prompt_tokens: int
    prefill_s: float
    ttft_s: float
    step_s: list[float]  # one entry per decoded token after the first


def time_run(backend: Backend, prompt: Sequence[int], new_tokens: int) -> RunTiming:
    """One timed generation of exactly ``new_tokens`` tokens (EOS ignored)."""
    backend.reset()
    t0 = time.perf_counter()
    logits = backend.prefill(prompt)
    t1 = time.perf_counter()
    token = int(np.argmax(logits))
    t2 = time.perf_counter()
    steps = []
    for _ in range(new_tokens - 1):
        s = time.perf_counter()
        token = int(np.argmax(backend.step(token)))  # a decode step includes choosing its token
        steps.append(time.perf_counter() - s)
    return RunTiming(len(prompt), t1 - t0, t2 - t0, steps)


def measure(backend: Backend, prompt: Sequence[int], *, new_tokens: int = NEW_TOKENS, warmup: int = WARMUP,
            repeats: int = REPEATS) -> dict[str, Any]:
    """Warm-up runs (discarded), then ``repeats`` timed runs, summarised."""
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 (one prefill token and one decode step)")
    for _ in range(warmup):
        time_run(backend, prompt, new_tokens)
    runs = [time_run(backend, prompt, new_tokens) for _ in range(repeats)]
    return summarise(runs) | {"warmup": warmup, "repeats": repeats, "prompt_tokens": len(prompt),
                              "new_tokens": new_tokens}


def summarise(runs: list[RunTiming]) -> dict[str, Any]:
    """Median and spread of per-run figures, and percentiles of single decode steps."""
    per_run = {
        "ttft_s": [r.ttft_s for r in runs],
        "prompt_tokens_per_s": [r.prompt_tokens / r.prefill_s for r in runs],
        "decode_tokens_per_s": [len(r.step_s) / sum(r.step_s) if r.step_s else float("nan") for r in runs],
    }
    out: dict[str, Any] = {}
    for name, values in per_run.items():
        out.update(spread(name, values))
    steps = np.concatenate([np.asarray(r.step_s) for r in runs]) if runs else np.zeros(0)
    out["token_latency_p50_s"] = float(np.percentile(steps, 50)) if steps.size else float("nan")
    out["token_latency_p95_s"] = float(np.percentile(steps, 95)) if steps.size else float("nan")
    out["runs"] = [{k: v for k, v in asdict(r).items() if k != "step_s"} | {"decode_s": sum(r.step_s)} for r in runs]
    return out


def spread(name: str, values: Sequence[float]) -> dict[str, float]:
    """``name`` (median), ``name_min``, ``name_max`` and ``name_spread`` ((max - min) / median)."""
    v = np.asarray(values, dtype=np.float64)
    if not v.size:
        return {name: float("nan")}
    med = float(np.median(v))
    return {name: med, f"{name}_min": float(v.min()), f"{name}_max": float(v.max()),
            f"{name}_spread": float((v.max() - v.min()) / med) if med else float("nan")}
