"""Training throughput and memory: edgeft QLoRA vs a plain Hugging Face Trainer QLoRA recipe.

Both sides train the same model on the same rows (an SST-2 slice formatted as an instruction
task through the chat template), with the same sequence length, batch, LoRA rank/targets and
step count. Each side runs in its own process so peak RSS is its own. The baseline is the
standard recipe: BitsAndBytesConfig(nf4, double quant, bf16 compute),
prepare_model_for_kbit_training (gradient checkpointing), peft LoRA, Trainer with
paged_adamw_8bit and DataCollatorForSeq2Seq (dynamic padding).

tokens/s counts real (non-pad) tokens, timed after the warm-up steps.

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--rows 256]
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

    from edgeft.data import load_rows, tokenize_rows
    from edgeft.models import load_tokenizer, resolve_model

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
    ap.add_argument("--baseline-compute-dtype", default="bfloat16", help="the recipe's bnb_4bit_compute_dtype")
    ap.add_argument("--side", choices=["edgeft", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    a = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if a.side:
        res = run_edgeft(a) if a.side == "edgeft" else run_baseline(a)
        print("RESULT " + json.dumps(res))
        return

    with tempfile.TemporaryDirectory() as wd:
        data = Path(wd) / "sst2.jsonl"
        write_data(data, a.rows)
        results = {}
        for side in ("baseline", "edgeft"):
            cmd = [sys.executable, __file__, "--side", side, "--data", str(data), "--workdir", wd,
                   "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch), "--seq-len", str(a.seq_len),
                   "--baseline-compute-dtype", a.baseline_compute_dtype] + (["--threads", str(a.threads)] if a.threads else [])
            print(f"running {side} ...", file=sys.stderr, flush=True)
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                sys.exit(f"{side} failed:\n{p.stderr[-3000:]}")
            results[side] = json.loads(line[-1][7:])
    b, e = results["baseline"], results["edgeft"]
    table = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "setup": {"model": "SmolLM2-135M-Instruct", "data": f"SST-2 train, first {a.rows} rows", "seq_len": a.seq_len,
                  "batch": a.batch, "steps": a.steps, "timed_steps": a.steps - a.warmup,
                  "baseline_compute_dtype": a.baseline_compute_dtype},
        "baseline": b, "edgeft": e,
        "speedup": e["tokens_per_s"] / b["tokens_per_s"], "memory_ratio": e["peak_rss_mb"] / b["peak_rss_mb"],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(table, indent=2) + "\n")
    print("| recipe | tokens/s | peak RSS (MiB) | final loss |\n|---|---|---|---|")
    print(f"| HF Trainer + peft + bnb QLoRA | {b['tokens_per_s']:.0f} | {b['peak_rss_mb']:.0f} | {b['final_loss']:.3f} |")
    print(f"| edgeft train --method qlora | {e['tokens_per_s']:.0f} | {e['peak_rss_mb']:.0f} | {e['final_loss']:.3f} |")
    print(f"| ratio (edgeft / baseline) | {table['speedup']:.2f}x | {table['memory_ratio']:.2f}x | |")
    ok = table["speedup"] >= 1.5 and table["memory_ratio"] <= 1.0
    print(f"target (>= 1.5x tokens/s, <= 1.0x memory): {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
