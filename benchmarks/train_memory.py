"""Where edgeft's QLoRA memory goes on CPU: an ablation of the choices in edgeft/cpumem.py.

Each variant trains the default model (same data and settings as bench_train.py's edgeft side)
in its own process and reports the peak resident memory of loading, the peak of the training
steps (the kernel's high-water mark, reset between the two), and tokens/s:

- ``none``: glibc's own heap policy, the weight file kept mapped, fp32 dequantization;
- ``+release``: the mapped weight file released after loading;
- ``+load-threshold``: and loading's transient tensors kept out of the heap;
- ``+dequant-bf16``: and 4-bit layers dequantizing into the compute dtype; these two run
  their steps with a 32 MiB threshold, where glibc's own policy settles;
- ``full``: and a 2 MiB threshold during steps (what edgeft does);
- ``step-1MiB``: as full, with a 1 MiB threshold during steps.

    .venv/bin/python benchmarks/train_memory.py [--steps 12] [--rows 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_train import child_result, quiet, write_data  # noqa: E402

VARIANTS = ("none", "+release", "+load-threshold", "+dequant-bf16", "full", "step-1MiB")


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in MiB (Linux)."""
    fields = dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines() if ":" in ln)
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM")}


def run_variant(variant: str, data: str, workdir: str, steps: int) -> dict:
    """Train once with ``variant``'s choices switched off (in this process)."""
    import edgeft.train.model as T  # where the memory policies are applied
    from edgeft.config import TrainConfig
    from edgeft.train import train

    level = VARIANTS.index(variant)
    if level < 1:
        T.release_file_mappings = lambda model: None
    if level < 2:
        T.LOAD_MMAP_THRESHOLD = 0  # 0: leave glibc's policy alone (see set_mmap_threshold below)
    if level < 3:
        T.dequantize_in_compute_dtype = lambda model, dtype: None
    if level < 4:
        T.STEP_MMAP_THRESHOLD = 32 << 20 if level >= 2 else 0
    if variant == "step-1MiB":
        T.STEP_MMAP_THRESHOLD = 1 << 20
    real_set = T.set_mmap_threshold
    T.set_mmap_threshold = lambda n: real_set(n) if n else None

    marks: dict[str, dict[str, int]] = {}
    real_load = T.load_model

    def load_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        marks["load"] = _status()
        Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark for the steps
        return model

    T.load_model = load_model
    out = Path(workdir) / variant
    cfg = TrainConfig(data=data, output=str(out), method="qlora", max_steps=steps, batch_size=4, max_seq_len=256,
                      lr=2e-4, lora_r=16, lora_alpha=32, eval_split=0.0, eval_every=0, save_every=0, seed=0,
                      optimizer="paged_adamw_8bit")
    train(cfg, overwrite=True)
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    m = [x for x in m if "loss" in x]
    tps = (m[-1]["tokens"] - m[1]["tokens"]) / (m[-1]["elapsed_s"] - m[1]["elapsed_s"])
    return {"variant": variant, "load_peak_mb": marks["load"]["VmHWM"], "after_load_mb": marks["load"]["VmRSS"],
            "steps_peak_mb": _status()["VmHWM"], "tokens_per_s": round(tps, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_memory.json"))
    a = ap.parse_args()
    quiet()
    if a.variant:
        print("RESULT " + json.dumps(run_variant(a.variant, a.data, a.workdir, a.steps)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as wd:
        data = Path(wd) / "sst2.jsonl"
        write_data(data, a.rows)
        for v in VARIANTS:
            print(f"{v} ...", file=sys.stderr, flush=True)
            rows.append(child_result([__file__, "--variant", v, "--data", str(data), "--workdir", wd,
                                      "--steps", str(a.steps)], v))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")
    print("| variant | loading peak MiB | after loading MiB | steps peak MiB | tokens/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['load_peak_mb']} | {r['after_load_mb']} | {r['steps_peak_mb']} | {r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
