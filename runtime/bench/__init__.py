"""Latency and accuracy of every exported artifact against the unmerged PyTorch model (``edgeft bench``).

``run_bench`` runs these stages, each in its own module:

1. ``inputs.check_inputs``: kind of every path and its verification record; then
   ``evalset.check_tokenizers``: every artifact's tokenizer encodes sample texts exactly as the
   reference's does. Every problem is reported at once, before any model is loaded.
2. ``evalset.eval_set``: the evaluation rows tokenised once, by the reference tokenizer, through
   its chat template: prompt ids, reference answer ids (+ end of turn), and the first compared
   position (the start of the last user turn); ``evalset.latency_prompt``: the latency workload.
3. ``reference_logits``: the size and disk the reference's compared logits need, refused early.
4. ``measure_bandwidth`` (runtime.machine): the memory-bandwidth ceiling, once.
5. ``workers``: one worker process per model (``runtime.worker``), the reference first: load,
   latency (warm-up + repeats), then teacher-forced logits and greedy answers. The reference's
   compared logits go to a float32 .npy that later workers memory-map.
6. ``summary.assemble``: per-artifact figures, ratios to the reference, bandwidth fraction, flags.
7. ``runtime.report``: report.json, report.md, PNG plots, the printed table; ``--strict`` raises
   ``ThresholdsNotMet`` (exit 4) when an artifact is flagged.

Token ids are produced once, by the reference tokenizer, and fed to every back-end, so every
artifact sees exactly the same inputs and decodes with the same greedy loop.
"""

from __future__ import annotations

from typing import Any

from edgeft.core.errors import EdgeftError
from runtime.bench.config import ANSWER_TOKENS, MAX_ROWS, STRICT_EXIT_CODE, BenchConfig, ThresholdsNotMet
from runtime.bench.evalset import (
    LATENCY_TEXT,
    MAX_COMPARED_PER_ROW,
    TOKENIZER_CHAT_SAMPLE,
    TOKENIZER_SAMPLES,
    EvalRow,
    EvalSet,
    check_tokenizers,
    eval_set,
    latency_prompt,
    reference_tokenizer,
    stop_ids,
    tokenizer_samples,
)
from runtime.bench.inputs import TOKENIZER_FILES, check_inputs, model_dir
from runtime.bench.reference_logits import (
    REF_LOGITS_MAX_BYTES,
    ensure_room_for_reference_logits,
    reference_logits_bytes,
)
from runtime.bench.summary import LATENCY_FIELDS, assemble
from runtime.bench.workers import WORK_DIR, WorkerPlan, benchmark_models, fresh_work_dir, run_worker, worker_env

__all__ = [
    "ANSWER_TOKENS", "LATENCY_FIELDS", "LATENCY_TEXT", "MAX_COMPARED_PER_ROW", "MAX_ROWS", "REF_LOGITS_MAX_BYTES",
    "STRICT_EXIT_CODE", "TOKENIZER_CHAT_SAMPLE", "TOKENIZER_FILES", "TOKENIZER_SAMPLES", "WORK_DIR",
    "BenchConfig", "EvalRow", "EvalSet", "ThresholdsNotMet", "WorkerPlan",
    "assemble", "check_inputs", "check_tokenizers", "eval_set", "latency_prompt", "reference_tokenizer",
    "run_bench", "run_worker", "stop_ids", "tokenizer_samples", "worker_env",
]


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Benchmark ``cfg.artifacts`` against ``cfg.reference``; write and return the report."""
    from edgeft.core.fsutil import prepare_output_dir
    from runtime import report as R
    from runtime.machine import machine_info, physical_cores, versions

    cfg.validate()
    reference, artifacts, records = check_inputs(cfg)
    tok = reference_tokenizer(reference)
    check_tokenizers(tok, reference, artifacts)
    evals = eval_set(tok, cfg.data, cfg.max_rows, cfg.answer_tokens, model_dir=model_dir(reference))
    prompt = latency_prompt(tok, cfg.prompt_tokens)
    threads = cfg.threads or physical_cores()
    logits_bytes = reference_logits_bytes(evals, len(tok))

    out = prepare_output_dir(cfg.output, overwrite=cfg.overwrite)
    ensure_room_for_reference_logits(out, logits_bytes)
    work = fresh_work_dir(out)
    machine = _machine_with_bandwidth(threads)
    plan = WorkerPlan(work=work, threads=threads, prompt=prompt, cfg=cfg, evals=evals,
                      max_tokens=max(evals.max_tokens, len(prompt) + cfg.new_tokens))
    results = benchmark_models(plan, [reference, *artifacts])
    machine["load_average_after"] = machine_info()["load_average"]

    report = assemble(cfg, reference, artifacts, records, results, evals, tok, machine, versions(), threads, prompt)
    R.write_report(report, out)
    R.print_table(report)
    failed = [e["error"] for e in report["entries"] if "error" in e]
    if failed:  # the report above holds what the others measured
        raise EdgeftError(f"{len(failed)} artifact(s) could not be benchmarked (report written to {out}): "
                          + "; ".join(failed))
    if cfg.strict:
        _raise_if_flagged(report)
    return report


def _machine_with_bandwidth(threads: int) -> dict[str, Any]:
    """``machine_info`` plus the memory bandwidth measured with ``threads`` threads."""
    from edgeft.core.progress import say
    from runtime.machine import machine_info, measure_bandwidth

    machine = machine_info()
    say(f"measuring memory bandwidth ({threads} threads)")
    machine["bandwidth"] = measure_bandwidth(threads)
    return machine


def _raise_if_flagged(report: dict[str, Any]) -> None:
    """``--strict``: ``ThresholdsNotMet`` naming every flagged artifact and its flags."""
    if report["flagged"]:
        names = "; ".join(f"{e['name']} ({', '.join(e['flags'])})" for e in report["entries"] if e["flags"])
        raise ThresholdsNotMet(f"--strict: {len(report['flagged'])} artifact(s) below the accuracy bars: {names}")
