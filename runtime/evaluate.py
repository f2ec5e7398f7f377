"""``edgeft eval``: task metrics of one model on an evaluation file, without the latency workload:
greedy answers (same chat template, token ids and greedy loop as ``edgeft bench``), answer
perplexity, classification or generation metrics with bootstrap intervals, and a confusion matrix.
Writes ``eval.json``, ``eval.md`` and (label-set answers) ``confusion.png``.
"""

from __future__ import annotations

import datetime as _dt
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft import __version__
from edgeft.core.errors import EdgeftError
from edgeft.core.fsutil import atomic_file, prepare_output_dir, write_json

ANSWERS_KEPT = 50  # answers written to eval.json, for reading by eye


@dataclass
class EvalConfig:
    model: Path
    data: Path
    output: Path
    tokenizer: Path | None = None  # needed for a GGUF (its source model's tokenizer directory)
    max_rows: int | None = None
    answer_tokens: int = 32
    threads: int | None = None
    resamples: int = 1000
    overwrite: bool = False


def _tokenizer_and_model_dir(cfg: EvalConfig, art: Any) -> tuple[Any, Path | None]:
    from runtime.artifacts import GGUF
    from runtime.bench.evalset import reference_tokenizer
    from runtime.bench.inputs import model_dir
    from runtime.modelfiles import load_tokenizer

    if cfg.tokenizer is not None:
        return load_tokenizer(str(cfg.tokenizer)), Path(cfg.tokenizer)
    if art.kind == GGUF:
        raise EdgeftError(f"--model {art.path}: a GGUF needs --tokenizer (the tokenizer directory of the model it "
                          "was exported from, e.g. the merged model)")
    return reference_tokenizer(art), model_dir(art)


def _answers_and_perplexity(cfg: EvalConfig, art: Any, evals: Any, threads: int) -> tuple[list[list[int]], float]:
    """Greedy answer ids of every row and the perplexity of the reference answers."""
    from runtime.backends import open_backend
    from runtime.worker import score

    backend = open_backend(art.kind, art.path, threads=threads, max_tokens=evals.max_tokens)
    try:
        with tempfile.TemporaryDirectory(prefix="edgeft-eval-") as work:
            spec = {"rows": [r.spec() for r in evals.rows], "answer_tokens": evals.answer_tokens,
                    "stop_ids": evals.stop_ids, "logits_file": str(Path(work) / "logits"), "write_logits": True}
            res = score(backend, spec)
    finally:
        backend.close()
    return res["generations"], res["perplexity"]


def evaluate_artifact(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.data``; write and return the result."""
    from runtime.artifacts import describe
    from runtime.bench.evalset import eval_set
    from runtime.machine import physical_cores
    from runtime.taskmetrics import metrics_by_task, task_metrics
    from runtime.taskreport import write_confusion_plots

    art = describe(cfg.model, flag="--model")
    tok, model_dir = _tokenizer_and_model_dir(cfg, art)
    evals = eval_set(tok, Path(cfg.data), cfg.max_rows, cfg.answer_tokens, model_dir=model_dir)
    out = prepare_output_dir(cfg.output, overwrite=cfg.overwrite)
    threads = cfg.threads or physical_cores()
    generations, perplexity = _answers_and_perplexity(cfg, art, evals, threads)
    texts = [tok.decode([t for t in g if t not in evals.stop_ids], skip_special_tokens=True) for g in generations]
    references = [r.answer for r in evals.rows]
    metrics = task_metrics(texts, references, resamples=cfg.resamples)
    by_task = metrics_by_task(texts, references, [r.task for r in evals.rows], resamples=cfg.resamples)
    result = {
        "model": str(art.path), "kind": art.kind, "precision": art.precision, "data": str(cfg.data),
        "rows": len(evals.rows), "rows_in_file": evals.total_rows, "answer_tokens": cfg.answer_tokens,
        "threads": threads, "perplexity": perplexity, "task_metrics": metrics, "task_metrics_by_task": by_task,
        "answers": [{"line": r.line, "reference": r.answer, "generated": t} | ({"task": r.task} if r.task else {})
                    for r, t in zip(evals.rows, texts)][:ANSWERS_KEPT],
        "edgeft_version": __version__, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / "eval.json", result)
    with atomic_file(out / "eval.md") as tmp:
        tmp.write_text(eval_markdown(result), encoding="utf-8")
    for path in write_confusion_plots([(art.name, metrics)], out):
        path.rename(out / "confusion.png")
    return result


def eval_markdown(result: dict[str, Any]) -> str:
    """``eval.md``: the model, the data, perplexity and the task metrics."""
    from runtime.taskreport import per_task_lines, task_lines

    name = Path(result["model"]).name
    lines = [f"# edgeft eval: `{result['model']}`", "",
             f"{result['kind']} ({result['precision']}), {result['rows']} rows of `{result['data']}`, greedy answers "
             f"of at most {result['answer_tokens']} tokens; answer perplexity {result['perplexity']:.4g}.", ""]
    lines += task_lines([(name, result["task_metrics"])])
    return "\n".join(lines + per_task_lines([(name, result.get("task_metrics_by_task"))]))
