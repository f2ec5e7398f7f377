"""One worker process per model (``python -m runtime.worker SPEC RESULT``), the reference first:
the work directory, each worker's spec and environment, running it, and reading its result.

A process per model keeps peak RSS per model and keeps torch out of the ONNX and llama.cpp runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgeft.core.errors import EdgeftError
from runtime.artifacts import Artifact
from runtime.bench.config import BenchConfig
from runtime.bench.evalset import EvalSet
from runtime.bench.reference_logits import logits_spec, reference_logits_file
from runtime.bench.summary import one_line_summary

WORK_DIR = ".work"  # inside --output; worker specs, results and the reference logits; removed at the end
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # put on the worker's PYTHONPATH


@dataclass
class WorkerPlan:
    """What every worker of one bench run shares."""

    work: Path
    threads: int
    prompt: list[int]
    cfg: BenchConfig
    evals: EvalSet
    max_tokens: int

    @property
    def logits_file(self) -> Path:
        return reference_logits_file(self.work)


def fresh_work_dir(out: Path) -> Path:
    """An empty ``out/.work`` (one left by an earlier run is removed)."""
    work = out / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


def benchmark_models(plan: WorkerPlan, models: list[Artifact]) -> list[dict[str, Any]]:
    """Run a worker on each of ``models`` (the reference first) with progress; their results, in order.

    The work directory is removed afterwards, failed or not, unless --keep-work.
    """
    from edgeft.core.progress import say, step_progress

    results = []
    try:
        with step_progress("bench", "current") as bar:
            task = bar.add_task("bench", total=len(models), current=models[0].name)
            rows = bar.add_task("evaluation rows", total=len(plan.evals.rows), current="")
            for i, art in enumerate(models):
                bar.update(task, current=f"{art.name} ({art.backend})")
                bar.reset(rows, total=len(plan.evals.rows))
                say(f"[{i + 1}/{len(models)}] {art.name}: {art.kind} {art.precision} on {art.backend}")
                res = run_worker(plan, art, reference=i == 0, index=i,
                                 on_rows=lambda done: bar.update(rows, completed=done))
                results.append(res)
                say(one_line_summary(art, res) if "error" not in res else f"    failed: {res['error']}")
                bar.advance(task)
    finally:
        if not plan.cfg.keep_work:
            shutil.rmtree(plan.work, ignore_errors=True)
    return results


def worker_spec(plan: WorkerPlan, art: Artifact, *, reference: bool) -> dict[str, Any]:
    """The spec ``runtime.worker`` reads (its docstring describes every field)."""
    cfg = plan.cfg
    return {
        "name": art.name, "kind": art.kind, "path": str(art.path), "threads": plan.threads,
        "max_tokens": -(-plan.max_tokens // 64) * 64,
        "latency": {"prompt": plan.prompt, "new_tokens": cfg.new_tokens, "warmup": cfg.warmup, "repeats": cfg.repeats},
        "accuracy": {"rows": [r.spec() for r in plan.evals.rows], "answer_tokens": cfg.answer_tokens,
                     "stop_ids": plan.evals.stop_ids, **logits_spec(plan.work, reference=reference)},
    }


def run_worker(plan: WorkerPlan, art: Artifact, *, reference: bool, index: int,
               on_rows: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run ``runtime.worker`` on ``art`` in a fresh process and return its result.

    The reference failing ends the bench (nothing can be compared without it); an artifact failing
    gives ``{"error": ...}`` so the report still holds what the others measured.
    """
    from edgeft.core.fsutil import write_json

    spec_path, out_path = plan.work / f"spec-{index}.json", plan.work / f"result-{index}.json"
    progress = plan.work / f"progress-{index}.txt"
    write_json(spec_path, {**worker_spec(plan, art, reference=reference), "progress_file": str(progress)})
    out_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(plan.work / f"stderr-{index}.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "runtime.worker", str(spec_path), str(out_path)],
                                env=worker_env(plan.threads), stdout=subprocess.DEVNULL, stderr=err)
        while proc.poll() is None:
            time.sleep(0.5)
            done = progress.read_text().split() if on_rows is not None and progress.is_file() else []
            if done:
                on_rows(int(done[0]))
    wall = time.perf_counter() - t0
    result = _read_result(out_path)
    if proc.returncode != 0 or "error" in result or not result:
        stderr = (plan.work / f"stderr-{index}.log").read_text(errors="replace")
        msg = result.get("error") or _last_line(stderr) or f"worker exited with status {proc.returncode}"
        role = "--reference" if reference else "--artifact"
        if reference:
            raise EdgeftError(f"{role} {art.path}: benchmark failed: {msg}")
        return {"error": f"{role} {art.path}: benchmark failed: {msg}", "worker_wall_s": wall}
    result["worker_wall_s"] = wall
    return result


def _read_result(path: Path) -> dict[str, Any]:
    """The worker's result JSON; empty when it wrote none or an unreadable one."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}


def worker_env(threads: int) -> dict[str, str]:
    """The worker's environment: this package importable, thread pools sized, libraries quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONWARNINGS="ignore", GGML_NO_BACKTRACE="1")
    return env


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:400] if lines else ""
