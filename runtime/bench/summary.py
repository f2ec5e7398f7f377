"""The report's figures from the workers' results (pure logic, no I/O): one entry per model with
task accuracy, bandwidth fraction, ratios to the reference and flags, plus the workload, bars and
config (``assemble``); and the one-line summary printed after each worker.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgeft import __version__
from runtime.artifacts import Artifact
from runtime.bench.config import BenchConfig
from runtime.bench.evalset import EvalSet
from runtime.thresholds import (TOP1_MIN, flags_for, paired_difference_interval, precision_class, top1_bar,
                                wilson_interval)

LATENCY_FIELDS = ("ttft_s", "ttft_s_min", "ttft_s_max", "ttft_s_spread",
                  "prompt_tokens_per_s", "prompt_tokens_per_s_min", "prompt_tokens_per_s_max", "prompt_tokens_per_s_spread",
                  "decode_tokens_per_s", "decode_tokens_per_s_min", "decode_tokens_per_s_max", "decode_tokens_per_s_spread",
                  "token_latency_p50_s", "token_latency_p95_s")
ANSWERS_IN_REPORT = 20  # per model: the first rows' answers, for reading by eye


def one_line_summary(art: Artifact, res: dict[str, Any]) -> str:
    """Decode speed, time to first token, top-1 agreement and peak RSS of one worker's result."""
    lat, acc = res.get("latency", {}), res.get("accuracy", {})
    return (f"    decode {lat.get('decode_tokens_per_s', float('nan')):.1f} tok/s, "
            f"TTFT {1000 * lat.get('ttft_s', float('nan')):.0f} ms, top-1 {acc.get('top1_agreement', float('nan')):.4f}, "
            f"peak RSS {res.get('peak_rss_bytes', 0) / 2**20:.0f} MiB")


def assemble(cfg: BenchConfig, reference: Artifact, artifacts: list[Artifact], records: dict[str, Any],
             results: list[dict[str, Any]], evals: EvalSet, tok: Any, machine: dict[str, Any],
             versions: dict[str, str], threads: int, prompt: list[int]) -> dict[str, Any]:
    """The report: one entry per model (reference first) plus machine, workload and bars."""
    bandwidth = machine["bandwidth"]["read_gbps"] * 1e9
    ref_gen = results[0]["accuracy"]["generations"]
    entries = [_entry(art, res if "error" not in res else _FAILED, record=records.get(str(art.path)) if i else None,
                      is_reference=i == 0, evals=evals, tok=tok, bandwidth=bandwidth, ref_gen=ref_gen)
               | ({"error": res["error"]} if "error" in res else {})
               for i, (art, res) in enumerate(zip([reference, *artifacts], results))]
    _compare_with_reference(entries, cfg)
    return {
        "edgeft_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reference": str(reference.path),
        "machine": machine, "versions": versions, "threads": threads,
        "workload": _workload(cfg, evals, prompt),
        "thresholds": {"top1_min_by_class": TOP1_MIN, "top1_overrides": cfg.top1_overrides,
                       "max_accuracy_drop": cfg.max_accuracy_drop},
        "bandwidth_note": ("decode limit = read bandwidth / weight bytes streamed per token (all weights, less an "
                           "input-embedding table that is only gathered; KV cache and activations ignored)"),
        "entries": entries,
        "flagged": [e["name"] for e in entries if e["flagged"]],
        "config": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                   for k, v in asdict(cfg).items()},
    }


# The figures of an artifact whose worker failed: none (its entry says why, and it is flagged).
_FAILED: dict[str, Any] = {
    "latency": {}, "weights": {"total": None, "per_token": None, "source": None}, "load_s": None,
    "peak_rss_bytes": None, "threads": None,
    "accuracy": {"generations": [], "perplexity": None, "top1_agreement": None, "mean_kl": None, "max_kl": None,
                 "max_abs_diff": None, "positions": 0},
}


def _entry(art: Artifact, res: dict[str, Any], *, record: dict[str, Any] | None, is_reference: bool,
           evals: EvalSet, tok: Any, bandwidth: float, ref_gen: list[list[int]]) -> dict[str, Any]:
    """One model's figures, before the ratios and flags that need the reference's entry."""
    lat, acc = res["latency"], res["accuracy"]
    gens = acc["generations"]
    texts, hits = _graded_answers(gens, evals, tok)
    per_token = res["weights"]["per_token"]
    limit = bandwidth / per_token if per_token else float("nan")
    return {
        "name": art.name, "role": "reference" if is_reference else "artifact", "path": str(art.path),
        "kind": art.kind, "backend": art.backend, "precision": art.precision,
        "precision_class": None if is_reference else precision_class(art.kind, art.precision),
        "size_bytes": art.size_bytes, "weight_bytes": res["weights"]["total"],
        "weight_bytes_per_token": per_token, "weight_bytes_source": res["weights"]["source"],
        "import_s": res.get("import_s"), "load_s": res["load_s"],
        **{k: lat.get(k) for k in LATENCY_FIELDS},
        "peak_rss_bytes": res["peak_rss_bytes"], "peak_rss_total_bytes": res.get("peak_rss_total_bytes"),
        "bandwidth_limit_tokens_per_s": limit,
        "bandwidth_fraction": (lat["decode_tokens_per_s"] / limit
                               if lat.get("decode_tokens_per_s") is not None and limit == limit and limit else None),
        "task_accuracy": sum(hits) / len(hits) if hits else None,
        "task_accuracy_ci95": list(wilson_interval(sum(hits), len(hits))) if hits else None,
        "_hits": hits,  # per row, for the paired interval against the reference (removed before writing)
        "task_metrics": _task_metrics(texts, evals),
        "task_metrics_by_task": _task_metrics(texts, evals, by_task=True),
        "perplexity": acc["perplexity"],
        "top1_agreement": acc["top1_agreement"], "mean_kl": acc["mean_kl"], "max_kl": acc["max_kl"],
        "max_abs_logprob_diff_topk": acc["max_abs_diff"], "compared_positions": acc["positions"],
        "generation_agreement": sum(a == b for a, b in zip(gens, ref_gen)) / len(gens) if gens else None,
        "verification": None if is_reference else (record or {}).get("status", "missing"),
        "threads": res["threads"], "torch_imported": res.get("torch_imported"),
        "worker_wall_s": res.get("worker_wall_s"),
        "latency_runs": lat.get("runs"),
        "answers": [{"line": r.line, "reference": r.answer, "generated": t, "correct": h}
                    | ({"task": r.task} if r.task is not None else {})
                    for r, t, h in zip(evals.rows, texts, hits)][:ANSWERS_IN_REPORT],
    }


def _graded_answers(gens: list[list[int]], evals: EvalSet, tok: Any) -> tuple[list[str], list[bool]]:
    """Task accuracy: each greedy answer decoded (end-of-turn ids dropped) and whether it matches the
    row's reference answer once both are normalised."""
    from edgeft.core.answers import normalise_answer

    texts = [tok.decode([t for t in g if t not in evals.stop_ids], skip_special_tokens=True) for g in gens]
    hits = [normalise_answer(t) == normalise_answer(r.answer) for t, r in zip(texts, evals.rows)]
    return texts, hits


def _compare_with_reference(entries: list[dict[str, Any]], cfg: BenchConfig) -> None:
    """Add ratios to the reference (``entries[0]``), the top-1 bar and the flags to every entry."""
    ref = entries[0]
    for e in entries:
        e["decode_speedup_vs_reference"] = _ratio(e["decode_tokens_per_s"], ref["decode_tokens_per_s"])
        e["ttft_ratio_vs_reference"] = _ratio(e["ttft_s"], ref["ttft_s"])
        e["size_ratio_vs_reference"] = _ratio(e["size_bytes"], ref["size_bytes"])
        if e["role"] == "reference":
            e["top1_bar"], e["flags"] = None, []
        elif "error" in e:
            e["top1_bar"], e["flags"] = None, [e["error"]]
        else:
            diff = paired_difference_interval(e["_hits"], ref["_hits"]) if e["_hits"] else None
            e["task_accuracy_diff_vs_reference"] = diff
            e["top1_bar"] = top1_bar(e["kind"], e["precision"], cfg.top1_overrides)
            e["flags"] = flags_for(e, ref["task_accuracy"], top1_overrides=cfg.top1_overrides,
                                   max_accuracy_drop=cfg.max_accuracy_drop, accuracy_diff=diff)
        e["flagged"] = bool(e["flags"])
    for e in entries:
        e.pop("_hits", None)


def _workload(cfg: BenchConfig, evals: EvalSet, prompt: list[int]) -> dict[str, Any]:
    """What every model was asked to do: the latency workload and the accuracy rows."""
    return {
        "latency": {"batch": 1, "prompt_tokens": len(prompt), "new_tokens": cfg.new_tokens, "eos_ignored": True,
                    "warmup": cfg.warmup, "repeats": cfg.repeats, "statistic": "median over repeats; min/max beside"},
        "accuracy": {"data": str(evals.path), "rows": len(evals.rows), "rows_in_file": evals.total_rows,
                     "compared_positions": evals.positions, "answer_tokens": cfg.answer_tokens,
                     "compared_from": "start of the last user turn (shared system prompt excluded), each distinct context "
                                      "once (a prefix shared by several rows is scored in one)",
                     "stop_ids": evals.stop_ids},
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _task_metrics(texts: list[str], evals: EvalSet, *, by_task: bool = False) -> dict[str, Any] | None:
    """Classification or generation metrics of the greedy answers, with bootstrap intervals; with
    ``by_task``, those of each task's rows (None when no row names a task)."""
    from runtime.taskmetrics import metrics_by_task, task_metrics

    if not texts:
        return None
    references = [r.answer for r in evals.rows]
    if by_task:
        return metrics_by_task(texts, references, [r.task for r in evals.rows])
    return task_metrics(texts, references)
