"""Throughput and peak memory of ``edgeft data clean`` on large generated JSON Lines files.

Generates instruction rows (~600 characters each; 4% exact duplicates with changed case and spacing,
4% near duplicates with one word changed, 2% with HTML), then runs ``edgeft data clean`` on each size
in its own process and reads that process's peak RSS from ``wait4``. Baseline in the same run:
the same file with ``--no-near-dup --no-dedup`` (cleaning and filters only), which shows what the
duplicate indexes cost. Writes ``benchmarks/results/data_clean.json``.

    .venv/bin/python benchmarks/bench_data.py --sizes-mb 50,200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("kettle water quickly warm hour switch base jug lifted like great poor price delivery screen battery "
         "charge sound quality light heavy small large fast slow colour size strap fabric steel glass wood paper "
         "garden kitchen office travel summer winter gift family child friend works broke returned arrived").split()


def make_row(rng: random.Random) -> dict:
    review = " ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 120)))
    return {"instruction": "Summarise the review in one sentence.", "input": review,
            "output": " ".join(rng.choice(WORDS) for _ in range(12))}


def generate(path: Path, size_mb: int, seed: int = 0) -> int:
    """Write about ``size_mb`` MB of rows with planted duplicates; returns the row count."""
    rng = random.Random(seed)
    recent: list[dict] = []
    rows, target = 0, size_mb * 1_000_000
    with open(path, "w", encoding="utf-8") as fh:
        while fh.tell() < target:
            r = rng.random()
            if r < 0.04 and recent:
                src = rng.choice(recent)
                row = dict(src, input="  " + src["input"].upper())
            elif r < 0.08 and recent:
                src = rng.choice(recent)
                words = src["input"].split()
                words[rng.randrange(len(words))] = rng.choice(WORDS)
                row = dict(src, input=" ".join(words))
            else:
                row = make_row(rng)
                if r > 0.98:
                    row["input"] = f"<p>{row['input']}</p><br>&amp;"
                recent = (recent + [row])[-1000:]
            fh.write(json.dumps(row) + "\n")
            rows += 1
    return rows


def run_clean(src: Path, out: Path, extra: list[str]) -> dict:
    """Run ``edgeft data clean`` in a child process; wall time, peak RSS and the report's counts."""
    cmd = [sys.executable, "-c", "from edgeft.cli import main; main()", "data", "clean", str(src),
           "--output", str(out), "--overwrite", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"clean failed: {proc.stderr.read().decode()[-2000:]}")
    report = json.loads(out.with_name(out.stem + ".report.json").read_text())
    size = src.stat().st_size
    return {"args": extra, "bytes": size, "wall_s": round(wall, 2), "mb_per_s": round(size / 1e6 / wall, 2),
            "rows_per_s": round(report["counts"]["read"] / wall), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "counts": report["counts"], "dropped": {k: v for k, v in report["reasons"].items() if k.startswith("dropped")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", default="50,200", help="comma-separated file sizes to generate (MB)")
    ap.add_argument("--workdir", default=None, help="where to write the generated files (default: a temp dir)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in [int(s) for s in args.sizes_mb.split(",")]:
            src = Path(tmp) / f"gen{size}.jsonl"
            rows = generate(src, size)
            for extra in (["--no-near-dup", "--no-dedup"], []):
                res = run_clean(src, Path(tmp) / "out.jsonl", extra)
                res.update(size_mb=size, rows=rows)
                results.append(res)
                print(f"{size} MB, {rows:,} rows, {' '.join(extra) or 'defaults'}: {res['wall_s']} s, "
                      f"{res['mb_per_s']} MB/s, {res['rows_per_s']:,} rows/s, peak RSS {res['peak_rss_mib']} MiB, "
                      f"dropped {res['dropped']}", flush=True)
    out = ROOT / "benchmarks" / "results" / "data_clean.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                               "python": platform.python_version(), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
