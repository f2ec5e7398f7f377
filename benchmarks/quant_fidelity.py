"""Quantized artifacts against the anchor, in one run: llama.cpp's plain quantization vs edgeft's.

Fine-tunes SmolLM2-135M-Instruct on an SST-2 train slice as ``bench_sst2.py`` does (QLoRA), merges
it, then writes, for the same merged model:

  (a) plain     llama.cpp's own quantization of each type: no importance matrix, no per-tensor
                overrides (what every other fine-tuning tool ships);
  (b) previous  edgeft's previous default: the type's higher-precision tensors, no importance matrix;
  (c) calibrated the higher-precision tensors, plus what the type's table row calibrates from the
                training rows: an importance matrix (k-quants) and/or the outlier smoothing (q8_0);
  (d) auto      ``--type auto --max-accuracy-drop 1`` judged on the dev rows;

and ONNX int8 and int4, plain and calibrated on the training rows (``ONNX_CALIBRATED``: int8 smoothed, and
smoothed with GPTQ; int4 with GPTQ). One ``edgeft bench`` then compares every artifact with the unmerged model
(computed in fp32) on the SST-2 dev rows: task accuracy with its 95% interval, top-1 agreement,
mean KL, size. Resumable: artifacts already written (with a passed or failed record) are kept.

    .venv/bin/python benchmarks/quant_fidelity.py [--dev-rows 872] [--types q4_k_m,q8_0] [--steps 100]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
SST2 = ROOT.parent / "shared" / "data" / "sst2"
# ONNX variants calibrated on the training rows, beside each plain one: (name suffix, --smooth, --gptq)
ONNX_CALIBRATED = {"int8": (("smoothed", True, False), ("smoothed-gptq", True, True)), "int4": (("gptq", False, True),)}


def variants(types: list[str]) -> list[tuple[str, str, dict]]:
    """(name, type, export options) for the GGUF side of the comparison."""
    from export.gguf.tables import QUANT_TYPES, QuantOptions

    out = []
    for t in types:
        out.append((f"{t}-plain", t, {"quant_options": QuantOptions(keep=False, imatrix=False)}))
        out.append((f"{t}-previous", t, {"quant_options": QuantOptions(keep=True, imatrix=False)}))
        if QUANT_TYPES[t].imatrix or QUANT_TYPES[t].smooth:  # what the table calibrates for this type
            out.append((f"{t}-calibrated", t, {"quant_options": QuantOptions(keep=True),
                                               "calibration": True}))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rows", type=int, default=800)
    ap.add_argument("--dev-rows", type=int, default=872)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--types", default="q4_k_m,q5_k_m,q8_0")
    ap.add_argument("--onnx", default="int8,int4")
    ap.add_argument("--no-auto", action="store_true")
    ap.add_argument("--auto-candidates", default="",
                    help="e.g. q4_k_m+imatrix,q8_0+gptq,q8_0 (default: every candidate of --type auto)")
    ap.add_argument("--verify-rows", type=int, default=256, help="dev rows each export is verified on")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "quant_fidelity")
    ap.add_argument("--prepare-only", action="store_true",
                    help="fine-tune and merge, then stop (what benchmarks/exact_transforms.py reads)")
    a = ap.parse_args()

    from bench_sst2 import to_jsonl

    from edgeft.config import TrainConfig
    from edgeft.core.records import passed_and_bound, record_path
    from edgeft.merge import merge_adapter
    from edgeft.train import train
    from export.gguf import export_gguf
    from export.gguf.auto import export_gguf_auto
    from export.onnx import export_onnx
    from runtime.bench import BenchConfig, run_bench

    out = a.output
    (out / "data").mkdir(parents=True, exist_ok=True)
    train_file = to_jsonl(SST2 / "train.tsv", out / "data" / "train.jsonl", a.train_rows)
    dev = to_jsonl(SST2 / "dev.tsv", out / "data" / "dev.jsonl", a.dev_rows)
    verify_rows = to_jsonl(SST2 / "dev.tsv", out / "data" / "dev-verify.jsonl", min(a.verify_rows, a.dev_rows))
    adapter, merged = out / "adapter", out / "merged"
    t0 = time.time()
    if not (adapter / "edgeft-run.json").is_file():
        train(TrainConfig(data=str(train_file), eval_data=str(dev), output=str(adapter), method="qlora",
                          max_steps=a.steps, batch_size=8, max_seq_len=256, lr=5e-4, warmup_steps=5, eval_every=0,
                          save_every=0, seed=0), overwrite=True)
    if not passed_and_bound(merged):
        merge_adapter(adapter, merged, overwrite=True)
    if a.prepare_only:
        print(f"{merged} ready after {time.time() - t0:.0f} s")
        return 0
    artifacts = []

    def have(path: Path) -> bool:
        return record_path(path).is_file()

    for name, qtype, opts in variants([t for t in a.types.split(",") if t]):
        path = out / f"{name}.gguf"
        if not have(path):
            kw = dict(opts)
            kw["calibration"] = train_file if kw.pop("calibration", False) else None
            export_gguf(merged, path, qtype=qtype, eval_data=verify_rows, overwrite=True, **kw)
        artifacts.append(path)
    if not a.no_auto:
        path = out / "auto.gguf"
        if not have(path):
            chosen = tuple((c.split("+")[0], "+" in c) for c in a.auto_candidates.split(",") if c)  # +imatrix, +gptq
            export_gguf_auto(merged, path, max_accuracy_drop=1.0, eval_data=verify_rows, calibration=train_file,
                             overwrite=True, **({"candidates": chosen} if chosen else {}))
        artifacts.append(path)
    for v in [v for v in a.onnx.split(",") if v]:
        for suffix, smooth, gptq in ((None, False, False), *ONNX_CALIBRATED.get(v, ())):
            path = out / (f"onnx-{v}-{suffix}" if suffix else f"onnx-{v}")
            if not have(path):
                export_onnx(merged, path, quantize=v, eval_data=verify_rows, overwrite=True, smooth=smooth, gptq=gptq,
                            calibration=train_file if smooth or gptq else None)
            artifacts.append(path)
    print(f"artifacts ready after {time.time() - t0:.0f} s")
    report = run_bench(BenchConfig(reference=adapter, artifacts=artifacts, data=dev, output=out / "bench",
                                   max_rows=a.dev_rows, overwrite=True, allow_unverified=True, repeats=1, warmup=0,
                                   new_tokens=16, prompt_tokens=32, answer_tokens=4))
    print(table(report))
    (out / "quant_fidelity.md").write_text(table(report) + "\n")
    return 0


def table(report: dict) -> str:
    entries = report["entries"]
    ref = entries[0]
    plain_kl = {e["name"].split("-")[0]: e["mean_kl"] for e in entries if e["name"].endswith("-plain.gguf")}
    lines = [f"Reference: unmerged QLoRA model in fp32, task accuracy {ref['task_accuracy']:.3f} on "
             f"{report['workload']['accuracy']['rows']} SST-2 dev rows.", "",
             "| artifact | size MiB | task acc (95% CI) | Δ vs ref (95% CI), points | top-1 | mean KL | KL / plain same type |",
             "|---|---|---|---|---|---|---|"]
    for e in entries[1:]:
        ci = e.get("task_accuracy_ci95") or [float("nan")] * 2
        d = e.get("task_accuracy_diff_vs_reference") or {"difference": float("nan"), "low": float("nan"),
                                                          "high": float("nan")}
        base = plain_kl.get(e["name"].split("-")[0])
        ratio = f"{e['mean_kl'] / base:.2f}" if base and e.get("mean_kl") is not None else "-"
        lines.append(f"| {e['name']} | {e['size_bytes'] / 2**20:.1f} | {e['task_accuracy']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}) "
                     f"| {100 * d['difference']:+.1f} ({100 * d['low']:+.1f}..{100 * d['high']:+.1f}) "
                     f"| {e['top1_agreement']:.4f} | {e['mean_kl']:.4f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
