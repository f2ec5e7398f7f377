"""Phone formats of one real fine-tune, each verified by its own runtime and benchmarked beside the others.

From a merged model (default: the SmolLM2-135M SST-2 QLoRA fine-tune that ``quant_fidelity.py`` writes) runs
the CLI as a user would:

    edgeft export onnx --format genai --quantize int4        ONNX Runtime GenAI folder
    edgeft export onnx --format ort --quantize int8          ORT-format model + operator list
    edgeft export executorch --quantize 8da8w --calibration  ExecuTorch program (XNNPACK), smoothed
    edgeft bench --reference ADAPTER --artifact ... --data DEV  one report: latency, size, peak memory, accuracy

Artifacts already written with a record are kept (resumable); the bench also takes the GGUF q4_k_m and
ONNX int8 of the same fine-tune when ``quant_fidelity.py`` wrote them, so the report compares every format
a phone or a laptop would run.

    .venv/bin/python benchmarks/phone_formats.py [--rows 100] [--formats genai-int4,ort-int8,executorch-8da8w]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QF = ROOT / "benchmarks" / "results" / "quant_fidelity"
FORMATS = {  # name -> the export command's arguments after --model/--output
    "genai-int4": ["onnx", "--format", "genai", "--quantize", "int4"],
    "genai-int8": ["onnx", "--format", "genai", "--quantize", "int8"],
    "ort-int8": ["onnx", "--format", "ort", "--quantize", "int8"],
    "executorch-8da8w": ["executorch", "--quantize", "8da8w", "--calibration", str(QF / "data" / "train.jsonl")],
    "executorch-8da4w": ["executorch", "--quantize", "8da4w", "--calibration", str(QF / "data" / "train.jsonl")],
}
ALSO = ("q4_k_m-calibrated.gguf", "q8_0-calibrated.gguf", "onnx-int8")  # quant_fidelity.py's, when present


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=QF / "merged")
    ap.add_argument("--adapter", type=Path, default=QF / "adapter", help="the bench's reference (run unmerged)")
    ap.add_argument("--data", type=Path, default=QF / "data" / "dev.jsonl")
    ap.add_argument("--formats", default="genai-int4,ort-int8,executorch-8da8w")
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "phone")
    a = ap.parse_args()
    if not (a.model / "config.json").is_file():
        sys.exit(f"{a.model}: no merged model; run benchmarks/quant_fidelity.py first or pass --model")
    edgeft = [sys.executable, "-m", "edgeft"]
    artifacts = []
    for name in a.formats.split(","):
        if name not in FORMATS:
            sys.exit(f"--formats: unknown {name}; choose from {', '.join(FORMATS)}")
        out = a.output / name
        if not (out / "edgeft-verify.json").is_file():
            cmd = [*edgeft, "export", FORMATS[name][0], "--model", str(a.model), "--output", str(out),
                   "--overwrite", *FORMATS[name][1:]]
            print("$", " ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=False)  # a failed verification still writes its record
        artifacts.append(out)
    artifacts += [QF / n for n in ALSO if (QF / n).exists()]
    cmd = [*edgeft, "bench", "--reference", str(a.adapter), "--data", str(a.data), "--max-rows", str(a.rows),
           "--output", str(a.output / "bench"), "--overwrite", "--allow-unverified", "--repeats", "2",
           "--new-tokens", "64", *[x for p in artifacts for x in ("--artifact", str(p))]]
    print("$", " ".join(cmd[2:]), flush=True)
    return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
