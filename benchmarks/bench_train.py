"""Training throughput and memory: edgeft QLoRA vs a plain Hugging Face Trainer QLoRA recipe.

Both sides train the same model on the same rows (an SST-2 slice formatted as an instruction
task through the chat template), with the same sequence length, batch, LoRA rank/targets and
step count. Each side runs in its own process so peak RSS is its own. The baseline is the
standard recipe: BitsAndBytesConfig(nf4, double quant, bf16 compute),
prepare_model_for_kbit_training (gradient checkpointing), peft LoRA, Trainer with
paged_adamw_8bit and DataCollatorForSeq2Seq (dynamic padding).

tokens/s counts real (non-pad) tokens, timed after the warm-up steps.

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--rows 256] [--repeats 3]

Each side runs --repeats times in alternation; the medians are compared and the worst pairing
is printed too. Writes benchmarks/results/train.json and train.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
PROMPT = "Classify the sentiment of this movie review as positive or negative.\n\nReview: {}"


def write_data(path: Path, rows: int) -> None:
    with open(SST2) as fh, open(path, "w") as out:
        for i, line in enumerate(fh):
            if i >= rows:
                break
            label, text = line.rstrip("\n").split("\t", 1)
            out.write(json.dumps({"instruction": PROMPT.format(text), "output": "positive" if label == "1" else "negative"}) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_edgeft(a) -> dict:
    from edgeft.config import TrainConfig
    from edgeft.train import train

    out = Path(a.workdir) / "edgeft"
    cfg = TrainConfig(data=a.data, output=str(out), method="qlora", max_steps=a.steps, batch_size=a.batch,
                      max_seq_len=a.seq_len, lr=2e-4, lora_r=16, lora_alpha=32, eval_split=0.0, eval_every=0,
                      save_every=0, seed=0, optimizer="paged_adamw_8bit", threads=a.threads)
    train(cfg, overwrite=True)
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    m = [x for x in m if "loss" in x]
    w = a.warmup
    return {"tokens_per_s": (m[-1]["tokens"] - m[w - 1]["tokens"]) / (m[-1]["elapsed_s"] - m[w - 1]["elapsed_s"]),
            "peak_rss_mb": peak_rss_mb(), "final_loss": m[-1]["loss"]}


def run_baseline(a) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from edgeft.core.rows import load_rows
    from edgeft.data import tokenize_rows
    from runtime.modelfiles import load_tokenizer

    from edgeft.models import resolve_model
    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = resolve_model(None)
    tok = load_tokenizer(model_dir)
    rows, _ = load_rows(a.data)
    examples, _ = tokenize_rows(tok, rows, a.seq_len)
    ds = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in examples]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=getattr(torch, a.baseline_compute_dtype))
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(Path(a.workdir) / "baseline"), per_device_train_batch_size=a.batch,
                             max_steps=a.steps, learning_rate=2e-4, optim="paged_adamw_8bit", lr_scheduler_type="cosine",
                             gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[Clock()],
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    mean_tokens = sum(len(e.input_ids) for e in examples) / len(examples)
    w = a.warmup
    tps = mean_tokens * a.batch * (len(times) - w) / (times[-1] - times[w - 1])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": tps, "peak_rss_mb": peak_rss_mb(), "final_loss": losses[-1] if losses else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from timing")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="runs per side; medians are compared")
    ap.add_argument("--baseline-compute-dtype", default="bfloat16", help="the recipe's bnb_4bit_compute_dtype")
    ap.add_argument("--side", choices=["edgeft", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    a = ap.parse_args()
    quiet()
    if a.side:
        res = run_edgeft(a) if a.side == "edgeft" else run_baseline(a)
        print("RESULT " + json.dumps(res))
        return

    with tempfile.TemporaryDirectory() as wd:
        data = Path(wd) / "sst2.jsonl"
        write_data(data, a.rows)
        runs: dict[str, list[dict]] = {"baseline": [], "edgeft": []}
        for rep in range(a.repeats):  # sides alternate, so drift in machine load hits both alike
            for side in ("baseline", "edgeft"):
                print(f"run {rep + 1}/{a.repeats}: {side} ...", file=sys.stderr, flush=True)
                runs[side].append(run_side(a, side, data, wd))
    b, e = summarise(runs["baseline"]), summarise(runs["edgeft"])
    table = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "setup": {"model": "SmolLM2-135M-Instruct", "data": f"SST-2 train, first {a.rows} rows", "seq_len": a.seq_len,
                  "batch": a.batch, "steps": a.steps, "timed_steps": a.steps - a.warmup, "repeats": a.repeats,
                  "baseline_compute_dtype": a.baseline_compute_dtype},
        "baseline": b, "edgeft": e, "runs": runs,
        "speedup": e["tokens_per_s"] / b["tokens_per_s"], "memory_ratio": e["peak_rss_mb"] / b["peak_rss_mb"],
        # Worst pairing of the repeats: the slowest edgeft run against the fastest baseline run,
        # and edgeft's largest peak against the baseline's smallest.
        "speedup_worst": e["tokens_per_s_min"] / b["tokens_per_s_max"],
        "memory_ratio_worst": e["peak_rss_mb_max"] / b["peak_rss_mb_min"],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(table, indent=2) + "\n")
    plot(table, Path(a.out).with_suffix(".png"))
    print(f"median of {a.repeats} runs per side (min-max)")
    print("| recipe | tokens/s | peak RSS (MiB) | final loss |\n|---|---|---|---|")
    for name, r in (("HF Trainer + peft + bnb QLoRA", b), ("edgeft train --method qlora", e)):
        print(f"| {name} | {r['tokens_per_s']:.0f} ({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f}) | "
              f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb_min']:.0f}-{r['peak_rss_mb_max']:.0f}) | {r['final_loss']:.3f} |")
    print(f"| ratio (edgeft / baseline) | {table['speedup']:.2f}x (worst {table['speedup_worst']:.2f}x) | "
          f"{table['memory_ratio']:.2f}x (worst {table['memory_ratio_worst']:.2f}x) | |")
    ok = table["speedup"] >= 1.5 and table["memory_ratio"] <= 1.0
    print(f"target on medians (>= 1.5x tokens/s, <= 1.0x memory): {'met' if ok else 'MISSED'}")
    print(f"wrote {a.out} and {Path(a.out).with_suffix('.png')}")


def run_side(a, side: str, data: Path, wd: str) -> dict:
    """One side in a fresh process, so its peak RSS is its own."""
    return child_result([__file__, "--side", side, "--data", str(data), "--workdir", wd, "--steps", str(a.steps),
                         "--warmup", str(a.warmup), "--batch", str(a.batch), "--seq-len", str(a.seq_len),
                         "--baseline-compute-dtype", a.baseline_compute_dtype]
                        + (["--threads", str(a.threads)] if a.threads else []), side)


def child_result(args: list[str], what: str) -> dict:
    """Run ``python ARGS`` and return the JSON of its ``RESULT`` line; exit with its stderr if it failed."""
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        sys.exit(f"{what} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def quiet() -> None:
    """Library warnings off: the benchmark prints its own table."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def summarise(runs: list[dict]) -> dict:
    import statistics

    out = {"final_loss": runs[-1]["final_loss"]}
    for key in ("tokens_per_s", "peak_rss_mb"):
        vals = [r[key] for r in runs]
        out.update({key: statistics.median(vals), f"{key}_min": min(vals), f"{key}_max": max(vals)})
    return out


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = ("baseline", "edgeft")
    labels = ("HF Trainer\n+ peft + bnb", "edgeft")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, key, title in ((axes[0], "tokens_per_s", "tokens/s (higher is better)"),
                           (axes[1], "peak_rss_mb", "peak RSS, MiB (lower is better)")):
        med = [table[s][key] for s in sides]
        err = [[m - table[s][f"{key}_min"] for s, m in zip(sides, med)],
               [table[s][f"{key}_max"] - m for s, m in zip(sides, med)]]
        ax.bar(labels, med, yerr=err, capsize=6, color=["#999999", "#2a7ab9"])
        ax.set_title(title, fontsize=10)
    ratio = f"{table['speedup']:.2f}x tokens/s, {table['memory_ratio']:.2f}x peak RSS"
    fig.suptitle(f"QLoRA on SmolLM2-135M, {table['setup']['repeats']} runs per side (median, min-max): {ratio}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
