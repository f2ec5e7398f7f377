"""Real-data benchmark: QLoRA on an SST-2 train slice, every export, evaluated on SST-2 dev.

Reads ``../shared/data/sst2/{train,dev}.tsv`` in place (writes JSONL copies of the slices
under the output directory only), then runs the whole pipeline (``edgeft run``) with every
ONNX and GGUF variant and the full latency workload (batch 1, 64-token prompt, 128 new
tokens), and prints the target table of ``bench_runtime.py``. Resumable: finished stages are
skipped when re-run.

    .venv/bin/python benchmarks/bench_sst2.py [--train-rows 800] [--dev-rows 64] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
SST2 = ROOT.parent / "shared" / "data" / "sst2"
INSTRUCTION = "Classify the sentiment of this movie review. Answer positive or negative."


def to_jsonl(tsv: Path, out: Path, rows: int) -> Path:
    with open(tsv, encoding="utf-8") as fh, open(out, "w", encoding="utf-8") as w:
        for i, line in enumerate(fh):
            if i >= rows:
                break
            label, text = line.rstrip("\n").split("\t", 1)
            w.write(json.dumps({"instruction": INSTRUCTION, "input": text,
                                "output": "positive" if label == "1" else "negative"}) + "\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rows", type=int, default=800)
    ap.add_argument("--dev-rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "sst2")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()

    from bench_runtime import target_table, targets

    from edgeft.config import TrainConfig
    from edgeft.demo import _accuracy
    from edgeft.core.fsutil import write_json
    from edgeft.models import resolve_model
    from edgeft.pipeline import PipelineConfig, run_pipeline

    data_dir = a.output / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train = to_jsonl(SST2 / "train.tsv", data_dir / "train.jsonl", a.train_rows)
    dev = to_jsonl(SST2 / "dev.tsv", data_dir / "dev.jsonl", a.dev_rows)
    summary_path = a.output / "sst2.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if "accuracy_before" not in summary:
        summary["accuracy_before"] = _accuracy(resolve_model(None), None, dev, None)
        write_json(summary_path, summary)
    cfg = PipelineConfig(
        output=a.output,
        train=TrainConfig(data=str(train), eval_data=str(dev), output=str(a.output / "adapter"), method="qlora",
                          max_steps=a.steps, batch_size=8, max_seq_len=256, lr=5e-4, warmup_steps=5, eval_every=50,
                          save_every=50, seed=0, threads=a.threads),
        onnx=["fp32", "int8", "int4"], gguf=["f16", "q8_0", "q4_k_m"], bench_data=str(dev),
        bench_threads=a.threads, bench_max_rows=a.dev_rows,
        bench_extra={"repeats": 3, "warmup": 1, "new_tokens": 128, "prompt_tokens": 64},
    )
    run_pipeline(cfg)
    report = json.loads((a.output / "bench" / "report.json").read_text())
    rows = targets(report)
    summary["accuracy_after"] = report["entries"][0]["task_accuracy"]
    summary["targets"] = rows
    write_json(summary_path, summary)
    print(f"SST-2 dev task accuracy: {summary['accuracy_before']:.1%} before -> {summary['accuracy_after']:.1%} "
          f"after fine-tuning (unmerged 4-bit + adapter)\n")
    print((a.output / "bench" / "report.md").read_text())
    print(target_table(report, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
