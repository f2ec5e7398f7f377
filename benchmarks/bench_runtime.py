"""Decode speed and accuracy of the edge artifacts against PyTorch, checked against the issue's targets.

Runs ``edgeft bench`` (``runtime.bench.run_bench``: one process per model, warm-up + repeats,
medians and spread, machine and versions recorded) and prints the target table:

    target                                              bar
    GGUF q4_k_m decode tokens/s vs PyTorch eager fp32   >= 4x
    ONNX int8 decode tokens/s vs PyTorch eager fp32     >= 2x
    GGUF q4_k_m decode tokens/s / bandwidth limit       >= 60%
    top-1 agreement with the unmerged reference         per precision (runtime.thresholds)

The baseline is the merged fp32 model run by PyTorch eager (an ``--artifact``); the reference
for accuracy is the unmerged adapter. The bandwidth limit is the machine's measured read
bandwidth divided by the bytes of weights a decode step streams (runtime.weights).

Artifacts from ``edgeft demo`` (default model SmolLM2-135M-Instruct)::

    .venv/bin/python benchmarks/bench_runtime.py --demo-dir runs/demo --output benchmarks/results/runtime

or name them (``--reference ADAPTER --artifact MERGED --artifact ONNX_DIR --artifact FILE.gguf
--data EVAL.jsonl``). ``--prepare`` builds whatever is missing in ``--demo-dir`` with the
project's own entry points (a short QLoRA run, merge, ONNX int8, GGUF q4_k_m). Small settings
for a smoke run: ``--max-rows 8 --new-tokens 32 --repeats 1``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (description, kind, precision, bar): decode speed-up over the PyTorch fp32 baseline.
SPEEDUP_TARGETS = (("GGUF q4_k_m decode vs PyTorch eager fp32", "gguf", "q4_k_m", 4.0),
                   ("ONNX int8 decode vs PyTorch eager fp32", "onnx", "int8", 2.0))
BANDWIDTH_TARGET = ("GGUF q4_k_m decode / bandwidth limit", "gguf", "q4_k_m", 0.60)
DEMO_LAYOUT = {"reference": "adapter", "merged": "merged", "onnx": "onnx-int8", "gguf": "model.q4_k_m.gguf",
               "data": "task/eval.jsonl"}


def prepare(demo: Path, steps: int) -> None:
    """Build the missing demo artifacts: QLoRA adapter (short run), merged fp32, ONNX int8, GGUF q4_k_m."""
    from edgeft.config import TrainConfig
    from edgeft.core.progress import say
    from edgeft.tasks import write_task

    data = demo / DEMO_LAYOUT["data"]
    if not data.is_file():
        write_task(data.parent)
    adapter = demo / DEMO_LAYOUT["reference"]
    if not (adapter / "adapter_model.safetensors").is_file():
        from edgeft.train import train

        say(f"training a QLoRA adapter ({steps} steps) into {adapter}")
        train(TrainConfig(data=str(data.parent / "train.jsonl"), output=str(adapter), method="qlora", max_steps=steps,
                          batch_size=8, max_seq_len=128, lr=1e-3, warmup_steps=2, eval_split=0.0, eval_every=0,
                          save_every=0, seed=0), overwrite=True)
    merged = demo / DEMO_LAYOUT["merged"]
    if not (merged / "edgeft-verify.json").is_file():
        from edgeft.merge import merge_adapter

        say(merge_adapter(adapter, merged, overwrite=True).summary())
    if not (demo / DEMO_LAYOUT["onnx"] / "edgeft-verify.json").is_file():
        from export.onnx import export_onnx

        say(export_onnx(merged, demo / DEMO_LAYOUT["onnx"], quantize="int8", overwrite=True).summary())
    gguf = demo / DEMO_LAYOUT["gguf"]
    if not gguf.with_name(gguf.name + ".verify.json").is_file():
        from export.gguf import export_gguf

        say(export_gguf(merged, gguf, qtype="q4_k_m", overwrite=True).summary())


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The target rows: what was measured for which artifact, the bar, and whether it was met."""
    entries = report["entries"]
    base = next((e for e in entries if e["kind"] == "merged" and e["precision"] == "fp32"), None)
    rows = []
    for text, kind, precision, bar in SPEEDUP_TARGETS:
        for e in (e for e in entries if e["kind"] == kind and e["precision"] == precision):
            value = e["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else None
            rows.append({"target": text, "artifact": e["name"], "value": value, "bar": bar, "unit": "x"})
    text, kind, precision, bar = BANDWIDTH_TARGET
    for e in (e for e in entries if e["kind"] == kind and e["precision"] == precision):
        rows.append({"target": text, "artifact": e["name"], "value": e["bandwidth_fraction"], "bar": bar, "unit": "%"})
    for e in entries:
        if e["role"] == "artifact":
            rows.append({"target": f"top-1 agreement ({e['kind']} {e['precision']})", "artifact": e["name"],
                         "value": e["top1_agreement"], "bar": e["top1_bar"], "unit": ""})
    for r in rows:
        r["met"] = r["value"] is not None and r["value"] >= r["bar"]
    if base is None:
        rows.insert(0, {"target": "baseline missing: pass a merged fp32 --artifact", "artifact": "-", "value": None,
                        "bar": None, "unit": "", "met": False})
    return rows


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if unit == "x" else f"{value:.0%}" if unit == "%" else f"{value:.4f}"


def target_table(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu_model']}, {report['threads']} threads, read bandwidth {m['bandwidth']['read_gbps']} GB/s, "
             f"load average {m['load_average']} -> {m.get('load_average_after')} (a busy machine lowers every speed figure)",
             "", "| target | artifact | measured | bar | met |", "|---|---|---|---|---|"]
    for r in rows:
        bar = "-" if r["bar"] is None else f">= {_fmt(r['bar'], r['unit'])}"
        lines.append(f"| {r['target']} | {r['artifact']} | {_fmt(r['value'], r['unit'])} | {bar} | "
                     f"{'yes' if r['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-dir", type=Path, help="an `edgeft demo` output directory (adapter, merged, onnx-int8, q4_k_m)")
    p.add_argument("--prepare", action="store_true", help="build the missing artifacts in --demo-dir first")
    p.add_argument("--train-steps", type=int, default=20, help="QLoRA steps when --prepare trains an adapter")
    p.add_argument("--reference", type=Path, help="adapter directory (the unmerged reference)")
    p.add_argument("--artifact", type=Path, action="append", default=[], help="artifact to benchmark (repeatable)")
    p.add_argument("--data", type=Path, help="evaluation JSONL")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "runtime")
    p.add_argument("--threads", type=int)
    p.add_argument("--max-rows", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--allow-unverified", action="store_true", help="benchmark artifacts that failed their verification")
    a = p.parse_args()

    from edgeft.core.errors import EdgeftError
    from edgeft.core.fsutil import atomic_file, write_json
    from runtime.bench import BenchConfig, run_bench

    reference, artifacts, data = a.reference, list(a.artifact), a.data
    if a.demo_dir:
        if a.prepare:
            a.demo_dir.mkdir(parents=True, exist_ok=True)
            prepare(a.demo_dir, a.train_steps)
        reference = reference or a.demo_dir / DEMO_LAYOUT["reference"]
        artifacts = artifacts or [a.demo_dir / DEMO_LAYOUT[k] for k in ("merged", "onnx", "gguf")]
        data = data or a.demo_dir / DEMO_LAYOUT["data"]
    if reference is None or data is None or not artifacts:
        p.error("give --demo-dir, or --reference, --data and at least one --artifact")
    cfg = BenchConfig(reference=reference, artifacts=artifacts, data=data, output=a.output, threads=a.threads,
                      max_rows=a.max_rows, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, repeats=a.repeats,
                      allow_unverified=a.allow_unverified, overwrite=True)
    try:
        report = run_bench(cfg)
    except EdgeftError as e:
        print(f"bench_runtime: error: {e.format_message()}", file=sys.stderr)
        return e.exit_code
    rows = targets(report)
    table = target_table(report, rows)
    print(table)
    write_json(a.output / "targets.json", rows)
    with atomic_file(a.output / "targets.md") as tmp:
        tmp.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
