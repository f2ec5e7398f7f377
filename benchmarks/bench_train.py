"""Training throughput and memory: edgeft QLoRA vs a plain Hugging Face Trainer QLoRA recipe.

Both sides train the same model on the same rows (an SST-2 slice formatted as an instruction
task through the chat template), with the same sequence length, batch, LoRA rank/targets and
step count. Each side runs in its own process so its peak memory is its own. The baseline is the
standard recipe: BitsAndBytesConfig(nf4, double quant, bf16 compute),
prepare_model_for_kbit_training (gradient checkpointing), peft LoRA, Trainer with
paged_adamw_8bit and DataCollatorForSeq2Seq (dynamic padding).

tokens/s counts real (non-pad) tokens, timed after the warm-up steps (on CUDA the GPU is
synchronised before every timestamp).

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--rows 256] [--repeats 3]

CPU mode (the default): SmolLM2-135M-Instruct, one row per sequence, peak RSS compared; writes
benchmarks/results/train.json and train.png.

GPU mode: a Llama-2-7B-shaped model with random weights (the embedded tokenizer's vocabulary),
written once per run as bf16 safetensors and loaded by both sides in 4-bit NF4 + double quant;
SST-2 rows packed into 2048-token sequences, batch 1; peak allocated and reserved GPU memory
compared; writes benchmarks/results/train-llama2-7b-cuda.json and .png:

    .venv/bin/python benchmarks/bench_train.py --device cuda --shape llama2-7b

``--shape tiny`` is the same Llama architecture at toy size, so the GPU-mode code path runs
anywhere (``--device cpu`` too). Each side runs --repeats times in alternation; the medians are
compared and the worst pairing is printed too.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_shapes import LABELS, build_model, data_seen, packed_sequences  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
PROMPT = "Classify the sentiment of this movie review as positive or negative.\n\nReview: {}"
# Defaults per device for the flags left unset (GPU mode: the 7B setting of issue #15).
DEFAULTS = {"cpu": {"seq_len": 256, "batch": 4, "rows": 256}, "cuda": {"seq_len": 2048, "batch": 1, "rows": 1024}}
GPU_PEAK_TARGET_GB = 5.5  # edgeft's peak allocated GPU memory, GB = 1e9 bytes
GPU_SPEEDUP_TARGET = 2.0
CPU_SPEEDUP_TARGET, CPU_MEMORY_TARGET = 1.5, 1.0


def write_data(path: Path, rows: int, tsv: Path = SST2) -> None:
    """The first ``rows`` rows of an SST-2 TSV (label, tab, text) as instruction rows."""
    with open(tsv) as fh, open(path, "w") as out:
        for i, line in enumerate(fh):
            if i >= rows:
                break
            label, text = line.rstrip("\n").split("\t", 1)
            out.write(json.dumps({"instruction": PROMPT.format(text), "output": "positive" if label == "1" else "negative"}) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_figures(device: str) -> dict:
    """This process's peaks: resident memory, and on CUDA the allocator's allocated and reserved."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if device == "cuda":
        import torch

        out.update(peak_allocated_mb=torch.cuda.max_memory_allocated() / 2**20,
                   peak_reserved_mb=torch.cuda.max_memory_reserved() / 2**20, device_name=torch.cuda.get_device_name(0))
    return out


class StepClock:
    """A timestamp after every optimizer step of this process (a global torch optimizer hook, so
    both recipes are timed at the same point); on CUDA queued kernels finish first."""

    def __init__(self, device: str):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times: list[float] = []
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        register_optimizer_step_post_hook(self._tick)

    def _tick(self, *_) -> None:
        self.sync()
        self.times.append(time.perf_counter())

    def rate(self, amount: float, steps: int, warmup: int) -> float:
        """``amount`` (counted over the steps after the warm-up) per second of those steps."""
        if len(self.times) != steps:
            sys.exit(f"the step clock saw {len(self.times)} optimizer steps, expected {steps}")
        return amount / (self.times[-1] - self.times[warmup - 1])


def model_ref(a) -> str | None:
    """The synthetic shape's checkpoint in the work dir; None: edgeft's embedded SmolLM2."""
    return None if a.shape == "smollm2" else str(Path(a.workdir) / "model")


def is_packed(a) -> bool:
    """GPU mode and the synthetic shapes train on packed sequences; SmolLM2 on CPU on single rows."""
    return a.device == "cuda" or a.shape != "smollm2"


def run_edgeft(a) -> dict:
    from edgeft.config import TrainConfig
    from edgeft.train import train

    out = Path(a.workdir) / "edgeft"
    cfg = TrainConfig(data=a.data, output=str(out), model=model_ref(a), method="qlora", max_steps=a.steps,
                      batch_size=a.batch, max_seq_len=a.seq_len, lr=2e-4, lora_r=16, lora_alpha=32, eval_split=0.0,
                      eval_every=0, save_every=0, seed=0, optimizer="paged_adamw_8bit", threads=a.threads,
                      device=a.device, packing=is_packed(a))
    clock = StepClock(a.device)
    train(cfg, overwrite=True)
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    m = [x for x in m if "loss" in x]
    tokens = m[-1]["tokens"] - m[a.warmup - 1]["tokens"]  # tokens of the timed steps, padding not counted
    return {"tokens_per_s": clock.rate(tokens, a.steps, a.warmup), "tokens_per_step": tokens / (a.steps - a.warmup),
            "final_loss": m[-1]["loss"], **memory_figures(a.device)}


def baseline_dataset(a, tok) -> list[dict]:
    """The rows as the Trainer sees them: one row per example, or edgeft's packed sequences flattened."""
    from edgeft.core.rows import load_rows
    from edgeft.data import tokenize_rows

    rows, _ = load_rows(a.data)
    examples, _ = tokenize_rows(tok, rows, a.seq_len)
    if is_packed(a):
        return packed_sequences(examples, a.seq_len)
    return [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in examples]


def run_baseline(a) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from edgeft.models import resolve_model
    from runtime.modelfiles import load_tokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    model_dir = model_ref(a) or resolve_model(None)
    tok = load_tokenizer(model_dir)
    ds = baseline_dataset(a, tok)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=getattr(torch, a.baseline_compute_dtype))
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, device_map={"": 0 if cuda else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    clock = StepClock(a.device)
    # On CUDA the recipe's usual bf16 autocast (LoRA and attention in bf16); on CPU as before, none.
    args = TrainingArguments(output_dir=str(Path(a.workdir) / "baseline"), per_device_train_batch_size=a.batch,
                             max_steps=a.steps, learning_rate=2e-4, optim="paged_adamw_8bit", lr_scheduler_type="cosine",
                             gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                             use_cpu=not cuda, bf16=cuda, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    per_step = a.batch * sum(len(x["input_ids"]) for x in ds) / len(ds)  # mean real tokens of a batch
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": clock.rate(per_step * (a.steps - a.warmup), a.steps, a.warmup), "tokens_per_step": per_step,
            "final_loss": losses[-1] if losses else None, **memory_figures(a.device)}


def run_build(a) -> dict:
    return build_model(a.shape, Path(a.workdir) / "model", a.device)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: GPU mode (GPU memory compared)")
    ap.add_argument("--shape", choices=list(LABELS), default="smollm2",
                    help="smollm2: the embedded model; llama2-7b / tiny: random-weight Llama built for the run")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from timing")
    ap.add_argument("--rows", type=int, help="SST-2 rows (default 256 on cpu, 1024 on cuda)")
    ap.add_argument("--sst2", type=Path, default=SST2, help="SST-2 train TSV (label<TAB>text per line)")
    ap.add_argument("--batch", type=int, help="sequences per step (default 4 on cpu, 1 on cuda)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence, the packing length too (default 256 / 2048)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="runs per side; medians are compared")
    ap.add_argument("--baseline-compute-dtype", default="bfloat16", help="the recipe's bnb_4bit_compute_dtype")
    ap.add_argument("--side", choices=["edgeft", "baseline", "build"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="JSON to write, a PNG beside it (default benchmarks/results/train.json for "
                                  "smollm2 on cpu, else train-<shape>-<device>.json)")
    a = ap.parse_args()
    for key, value in DEFAULTS[a.device].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if not 1 <= a.warmup < a.steps:
        ap.error(f"--warmup {a.warmup}: must be at least 1 and below --steps {a.steps}")
    if a.out is None:
        name = "train.json" if (a.shape, a.device) == ("smollm2", "cpu") else f"train-{a.shape}-{a.device}.json"
        a.out = str(ROOT / "benchmarks" / "results" / name)
    return a


def main() -> None:
    a = parse_args()
    quiet()
    if a.side:
        if a.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        side = {"edgeft": run_edgeft, "baseline": run_baseline, "build": run_build}[a.side]
        print("RESULT " + json.dumps(side(a)))
        return
    if a.device == "cuda":
        require_cuda()

    model = None
    with tempfile.TemporaryDirectory() as wd:
        data = Path(wd) / "sst2.jsonl"
        write_data(data, a.rows, a.sst2)
        if a.shape != "smollm2":
            print(f"building the {a.shape} model ...", file=sys.stderr, flush=True)
            model = run_side(a, "build", data, wd)
        runs: dict[str, list[dict]] = {"baseline": [], "edgeft": []}
        for rep in range(a.repeats):  # sides alternate, so drift in machine load hits both alike
            for side in ("baseline", "edgeft"):
                print(f"run {rep + 1}/{a.repeats}: {side} ...", file=sys.stderr, flush=True)
                runs[side].append(run_side(a, side, data, wd))
    table = make_table(a, runs, model)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(table, indent=2) + "\n")
    plot(table, Path(a.out).with_suffix(".png"))
    print_table(table)
    print(f"wrote {a.out} and {Path(a.out).with_suffix('.png')}")


def require_cuda() -> None:
    """Exit with one line, before any work, where torch sees no GPU."""
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"no CUDA device: torch {torch.__version__} sees no GPU (torch.cuda.is_available() is false); "
                 "run with --device cpu")


def memory_keys(device: str) -> list[str]:
    """The memory figures compared, the first one being the one the ratio and targets use."""
    return ["peak_allocated_mb", "peak_reserved_mb"] if device == "cuda" else ["peak_rss_mb"]


def make_table(a, runs: dict[str, list[dict]], model: dict | None) -> dict:
    """The JSON: machine, setup, per-side medians, every run, ratios and targets."""
    mem = memory_keys(a.device)
    b, e = summarise(runs["baseline"], ["tokens_per_s", *mem]), summarise(runs["edgeft"], ["tokens_per_s", *mem])
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "device": a.device}
    if a.device == "cuda":
        machine["gpu"] = runs["edgeft"][0]["device_name"]
    setup = {"model": LABELS[a.shape], "data": data_seen(a.rows, a.seq_len, is_packed(a)), "seq_len": a.seq_len,
             "batch": a.batch, "steps": a.steps, "timed_steps": a.steps - a.warmup, "repeats": a.repeats,
             "baseline_compute_dtype": a.baseline_compute_dtype}
    if a.device == "cuda":
        setup["baseline_autocast"] = "bf16 (TrainingArguments(bf16=True))"
        setup["memory_note"] = ("peak allocated/reserved are torch.cuda.max_memory_allocated/reserved of each side's "
                                "process; paged optimizer state lives in CUDA managed memory, outside both figures")
    if model is not None:
        setup["model_build"] = model
    if is_packed(a):
        setup["tokens_per_step"] = {s: runs[s][-1]["tokens_per_step"] for s in ("edgeft", "baseline")}
    table = {"machine": machine, "setup": setup, "baseline": b, "edgeft": e, "runs": runs,
             # Worst pairing of the repeats: the slowest edgeft run against the fastest baseline run,
             # and edgeft's largest peak against the baseline's smallest.
             "speedup": e["tokens_per_s"] / b["tokens_per_s"], "speedup_worst": e["tokens_per_s_min"] / b["tokens_per_s_max"]}
    for key, name in zip(mem, ("memory_ratio", "reserved_ratio")):
        table[name] = e[key] / b[key]
        table[f"{name}_worst"] = e[f"{key}_max"] / b[f"{key}_min"]
    table["targets"] = targets(table, a.device)
    return table


def targets(table: dict, device: str) -> dict:
    """The issue's targets, checked on the medians."""
    if device == "cuda":
        gb = table["edgeft"]["peak_allocated_mb"] * 2**20 / 1e9
        return {"edgeft_peak_allocated_gb": gb, "edgeft_peak_allocated_max_gb": GPU_PEAK_TARGET_GB,
                "speedup_min": GPU_SPEEDUP_TARGET,
                "met": gb <= GPU_PEAK_TARGET_GB and table["speedup"] >= GPU_SPEEDUP_TARGET}
    return {"speedup_min": CPU_SPEEDUP_TARGET, "memory_ratio_max": CPU_MEMORY_TARGET,
            "met": table["speedup"] >= CPU_SPEEDUP_TARGET and table["memory_ratio"] <= CPU_MEMORY_TARGET}


def print_table(table: dict) -> None:
    cuda = table["machine"]["device"] == "cuda"
    mem = memory_keys("cuda" if cuda else "cpu")
    heads = {"peak_rss_mb": "peak RSS (MiB)", "peak_allocated_mb": "peak allocated (MiB)",
             "peak_reserved_mb": "peak reserved (MiB)"}
    keys = ["tokens_per_s", *mem]
    print(f"median of {table['setup']['repeats']} runs per side (min-max)" + (f"; {table['machine']['gpu']}" if cuda else ""))
    print("| recipe | tokens/s | " + " | ".join(heads[k] for k in mem) + " | final loss |")
    print("|---" * (len(keys) + 2) + "|")
    for name, side in (("HF Trainer + peft + bnb QLoRA", "baseline"), ("edgeft train --method qlora", "edgeft")):
        r = table[side]
        cells = [f"{r[k]:.0f} ({r[k + '_min']:.0f}-{r[k + '_max']:.0f})" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + f" | {r['final_loss']:.3f} |")
    ratios = ["speedup", "memory_ratio", "reserved_ratio"][: len(keys)]
    print("| ratio (edgeft / baseline) | " + " | ".join(f"{table[k]:.2f}x (worst {table[k + '_worst']:.2f}x)" for k in ratios)
          + " | |")
    t, verdict = table["targets"], "met" if table["targets"]["met"] else "MISSED"
    if cuda:
        print(f"targets on medians (GPU mode, set for --shape llama2-7b): edgeft peak allocated "
              f"{t['edgeft_peak_allocated_gb']:.2f} GB (<= {GPU_PEAK_TARGET_GB} GB), tokens/s {table['speedup']:.2f}x "
              f"(>= {GPU_SPEEDUP_TARGET:.0f}x): {verdict}")
    else:
        print(f"target on medians (>= {CPU_SPEEDUP_TARGET}x tokens/s, <= {CPU_MEMORY_TARGET}x memory): {verdict}")


def run_side(a, side: str, data: Path, wd: str) -> dict:
    """One side (or the model build) in a fresh process, so its peak memory is its own."""
    return child_result([__file__, "--side", side, "--data", str(data), "--workdir", wd, "--steps", str(a.steps),
                         "--warmup", str(a.warmup), "--batch", str(a.batch), "--seq-len", str(a.seq_len),
                         "--rows", str(a.rows), "--device", a.device, "--shape", a.shape,
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


def summarise(runs: list[dict], keys: list[str] | None = None) -> dict:
    """Median, min and max of each of ``keys`` over the runs (tokens/s and peak RSS by default)."""
    import statistics

    out = {"final_loss": runs[-1]["final_loss"]}
    for key in keys or ["tokens_per_s", "peak_rss_mb"]:
        vals = [r[key] for r in runs]
        out.update({key: statistics.median(vals), f"{key}_min": min(vals), f"{key}_max": max(vals)})
    return out


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = ("baseline", "edgeft")
    labels = ("HF Trainer\n+ peft + bnb", "edgeft")
    titles = {"tokens_per_s": "tokens/s (higher is better)", "peak_rss_mb": "peak RSS, MiB (lower is better)",
              "peak_allocated_mb": "peak GPU allocated, MiB (lower is better)",
              "peak_reserved_mb": "peak GPU reserved, MiB (lower is better)"}
    keys = ["tokens_per_s", *memory_keys(table["machine"]["device"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    for ax, key in zip(axes, keys):
        med = [table[s][key] for s in sides]
        err = [[m - table[s][f"{key}_min"] for s, m in zip(sides, med)],
               [table[s][f"{key}_max"] - m for s, m in zip(sides, med)]]
        ax.bar(labels, med, yerr=err, capsize=6, color=["#999999", "#2a7ab9"])
        ax.set_title(titles[key], fontsize=10)
    memory = "peak GPU allocated" if table["machine"]["device"] == "cuda" else "peak RSS"
    ratio = f"{table['speedup']:.2f}x tokens/s, {table['memory_ratio']:.2f}x {memory}"
    fig.suptitle(f"QLoRA on {table['setup']['model']}, {table['setup']['repeats']} runs per side (median, min-max): "
                 f"{ratio}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
