"""Data-parallel scaling: `edgeft train` on 1 process against `--num-processes 2`, the same global batch.

Both train SmolLM2-135M-Instruct (the embedded default) on the same SST-2 rows with the same
global batch (1 process x batch B against 2 processes x batch B/2), so they take the same
optimizer steps on the same rows. Reported: tokens/s over all processes (timed after the warm-up
steps) and the peak RSS of each process (from the run record). On CPU, 1 process uses every core
and the 2 processes get half each, so the figure measures the cost of DDP (gloo all-reduce of the
LoRA gradients, the frozen base held once per process), not a gain: on one socket the cores are
the same either way. On GPUs (`--device cuda`) each process has its own device.

    .venv/bin/python benchmarks/bench_distributed.py [--steps 10] [--repeats 2] [--method qlora] [--sharding ddp|fsdp]

Writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ROOT, summarise, write_data  # noqa: E402  (same data and summary as the training bench)


def run_edgeft(a, data: Path, out: Path, processes: int) -> dict:
    """One `edgeft train` invocation on ``processes`` processes; figures from its metrics and record."""
    cmd = [sys.executable, "-m", "edgeft", "train", "--data", str(data), "--output", str(out), "--overwrite",
           "--method", a.method, "--max-steps", str(a.steps), "--batch-size", str(a.batch // processes),
           "--max-seq-len", str(a.seq_len), "--eval-split", "0", "--eval-every", "0", "--save-every", "0",
           "--seed", "0", "--device", a.device, "--num-processes", str(processes), "--sharding", a.sharding,
           *(["--optimizer", a.optimizer] if a.optimizer else [])]
    threads = str(max(1, (os.cpu_count() or 1) // processes)) if a.device == "cpu" else "1"
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{processes} process(es) failed:\n{p.stderr[-3000:]}")
    m = [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    w = a.warmup
    fm = json.loads((out / "edgeft-run.json").read_text())["final_metrics"]
    per_process = fm.get("peak_memory_mb_per_process", [fm["peak_memory_mb"]])
    return {"tokens_per_s": (m[-1]["tokens"] - m[w - 1]["tokens"]) / (m[-1]["elapsed_s"] - m[w - 1]["elapsed_s"]),
            "peak_rss_mb": max(per_process), "peak_rss_mb_per_process": per_process, "final_loss": m[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from timing")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="global batch (rows per optimizer step)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--method", default="qlora", choices=["qlora", "lora", "full"])
    ap.add_argument("--sharding", default="ddp", choices=["ddp", "fsdp"], help="how the 2 processes hold the model")
    ap.add_argument("--optimizer", default=None, help="default: edgeft's (fsdp: adamw, the one it can shard)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=2, help="runs per process count; medians are reported")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed.json"))
    a = ap.parse_args()
    if a.sharding == "fsdp" and a.optimizer is None:
        a.optimizer = "adamw"

    runs: dict[str, list[dict]] = {"1": [], "2": []}
    with tempfile.TemporaryDirectory() as wd:
        data = Path(wd) / "sst2.jsonl"
        write_data(data, a.rows)
        for rep in range(a.repeats):  # alternate, so drift in machine load hits both alike
            for n in (1, 2):
                print(f"run {rep + 1}/{a.repeats}: {n} process(es) ...", file=sys.stderr, flush=True)
                runs[str(n)].append(run_edgeft(a, data, Path(wd) / f"out{n}", n))
    table = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "device": a.device},
             "setup": {"model": "SmolLM2-135M-Instruct", "method": a.method, "sharding": a.sharding,
                       "optimizer": a.optimizer or "edgeft default", "data": f"SST-2 train, first {a.rows} rows",
                       "seq_len": a.seq_len, "global_batch": a.batch, "steps": a.steps,
                       "timed_steps": a.steps - a.warmup, "repeats": a.repeats},
             "runs": runs, **{f"processes_{n}": summarise(r) for n, r in runs.items()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(table, indent=2) + "\n")
    print(f"median of {a.repeats} runs (min-max); {os.cpu_count()} cores, {a.device}, {a.method}, {a.sharding}")
    print("| processes | tokens/s (all processes) | peak RSS per process MiB | final loss |\n|---|---|---|---|")
    for n in ("1", "2"):
        s = table[f"processes_{n}"]
        per = " / ".join(f"{mb:.0f}" for mb in runs[n][-1]["peak_rss_mb_per_process"])
        print(f"| {n} x batch {a.batch // int(n)} | {s['tokens_per_s']:.0f} ({s['tokens_per_s_min']:.0f}-"
              f"{s['tokens_per_s_max']:.0f}) | {per} | {s['final_loss']:.3f} |")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
