"""``edgeft eval``: task metrics of one model (adapter, merged, ONNX or GGUF) on an evaluation file.

Registered in ``edgeft/cli.py``; the command parses options into an ``EvalConfig`` and calls
``runtime.evaluate.evaluate_artifact``.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("eval")
@click.option("--model", required=True, type=click.Path(path_type=Path),
              help="Adapter directory, merged model directory, ONNX export directory or .gguf file.")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Evaluation file (instruction/chat/prompt-completion): the last assistant turn is the reference answer.")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for eval.json, eval.md and confusion.png.")
@click.option("--tokenizer", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Tokenizer directory (required for a .gguf: the model it was exported from).")
@click.option("--max-rows", type=int, default=None, help="Use the first N rows.")
@click.option("--answer-tokens", type=int, default=32, show_default=True, help="Longest greedy answer.")
@click.option("--threads", type=int, default=None, help="Threads (default: physical cores).")
@click.option("--resamples", type=int, default=1000, show_default=True, help="Bootstrap resamples for the intervals.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --output directory.")
def eval_cmd(model: Path, data: Path, output: Path, tokenizer: Path | None, max_rows: int | None, answer_tokens: int,
             threads: int | None, resamples: int, overwrite: bool) -> None:
    """Accuracy/precision/recall/F1 or exact match/BLEU/ROUGE-L, perplexity, bootstrap intervals."""
    from runtime.evaluate import EvalConfig, evaluate_artifact
    from runtime.taskreport import metric_cells

    result = evaluate_artifact(EvalConfig(model=model, data=data, output=output, tokenizer=tokenizer,
                                          max_rows=max_rows, answer_tokens=answer_tokens, threads=threads,
                                          resamples=resamples, overwrite=overwrite))
    m = result["task_metrics"]
    click.echo(f"{result['rows']} rows, {m['kind']}: " + ", ".join(metric_cells(m))
               + f"; perplexity {result['perplexity']:.4g}; {output / 'eval.json'}")
    for task, tm in (result.get("task_metrics_by_task") or {}).items():
        click.echo(f"  task {task}: {tm['rows']} rows, {tm['kind']}: " + ", ".join(metric_cells(tm)))
