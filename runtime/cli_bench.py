"""``edgeft bench``: latency and accuracy of exported artifacts against the unmerged PyTorch model.

Registered in ``edgeft/cli.py`` with ``cli.add_command(bench_cmd)``. The command only parses
options into a ``BenchConfig`` and calls ``runtime.bench.run_bench``. Importing it costs numpy
and click only (transformers and the engines load inside the run).
"""

from __future__ import annotations

from pathlib import Path

import click

from runtime.bench import ANSWER_TOKENS, MAX_ROWS, BenchConfig, run_bench
from runtime.latency import NEW_TOKENS, PROMPT_TOKENS, REPEATS, WARMUP
from runtime.thresholds import ACCURACY_DROP_MAX, parse_top1_overrides


@click.command("bench")
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="Adapter directory from `edgeft train` (run unmerged: 4-bit or 16-bit base + LoRA) or a merged model directory.")
@click.option("--artifact", "artifacts", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Merged model directory, ONNX export directory or .gguf file (repeat the option for several).")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Evaluation file (instruction/chat/prompt-completion JSONL): the last assistant turn is the reference answer.")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for report.json, report.md, latency.png and accuracy_vs_size.png.")
@click.option("--strict", is_flag=True, help="Exit with status 4 when any artifact falls below its accuracy bars.")
@click.option("--threads", type=int, default=None, help="Threads for every engine (default: physical cores).")
@click.option("--max-rows", type=int, default=MAX_ROWS, show_default=True, help="Use the first N evaluation rows.")
@click.option("--prompt-tokens", type=int, default=PROMPT_TOKENS, show_default=True, help="Latency workload: prompt length.")
@click.option("--new-tokens", type=int, default=NEW_TOKENS, show_default=True,
              help="Latency workload: tokens generated per run (end of sequence ignored).")
@click.option("--warmup", type=int, default=WARMUP, show_default=True, help="Untimed runs before timing.")
@click.option("--repeats", type=int, default=REPEATS, show_default=True, help="Timed runs (median and spread reported).")
@click.option("--answer-tokens", type=int, default=ANSWER_TOKENS, show_default=True,
              help="Longest greedy answer for task accuracy (stops at end of turn).")
@click.option("--min-top1", "top1_overrides", multiple=True, metavar="[CLASS=]VALUE",
              callback=lambda _ctx, _param, values: parse_top1_overrides(values),
              help="Top-1 agreement bar: VALUE for every artifact, or CLASS=VALUE for one precision class "
                   "(lossless 0.995, 8-bit 0.98, 4-bit 0.95 by default). Repeatable.")
@click.option("--max-accuracy-drop", type=float, default=ACCURACY_DROP_MAX, show_default=True,
              help="How far task accuracy may fall below the reference's (0.01 = one point).")
@click.option("--allow-unverified", is_flag=True, help="Benchmark artifacts whose verification record is missing or failed.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --output directory.")
@click.option("--keep-work", is_flag=True, help="Keep --output/.work (worker specs, results, reference logits, logs).")
def bench_cmd(reference: Path, artifacts: tuple[Path, ...], data: Path, output: Path, strict: bool, threads: int | None,
              max_rows: int, prompt_tokens: int, new_tokens: int, warmup: int, repeats: int, answer_tokens: int,
              top1_overrides: dict[str, float], max_accuracy_drop: float, allow_unverified: bool, overwrite: bool,
              keep_work: bool) -> None:
    """Latency and accuracy of every artifact against the unmerged PyTorch model, in one report."""
    cfg = BenchConfig(reference=reference, artifacts=list(artifacts), data=data, output=output, threads=threads,
                      max_rows=max_rows, prompt_tokens=prompt_tokens, new_tokens=new_tokens, warmup=warmup,
                      repeats=repeats, answer_tokens=answer_tokens, allow_unverified=allow_unverified,
                      top1_overrides=top1_overrides, max_accuracy_drop=max_accuracy_drop, strict=strict, overwrite=overwrite,
                      keep_work=keep_work)
    report = run_bench(cfg)
    click.echo(f"report: {output / 'report.json'} ({len(report['entries'])} models, "
               f"{len(report['flagged'])} flagged)")
