"""Which merge policy reproduces a QLoRA-trained model: ``base`` or ``nf4-dequant``?

Trains a small QLoRA adapter on the embedded default model (SmolLM2-135M-Instruct, fp32) the way
``edgeft train --method qlora`` does on CPU (NF4, double quant, fp32 compute, r=8 on all linear
layers), then merges it with both policies and each output dtype through
``edgeft.merge.merge_adapter``, and reports top-1 agreement and mean KL of every merged model
against the unmerged 4-bit model as trained. Reference rows put the figures in scale: how far
the adapter moved the model, the 4-bit quantization gap of the base alone, and how far
bitsandbytes' CPU inference kernel (bf16 activations) is from the training compute path.

No network: the model is the embedded GGUF, the text is SST-2 from ../shared/data.

    .venv/bin/python benchmarks/merge_policy.py
    .venv/bin/python benchmarks/merge_policy.py --threads 1 --dtypes fp32   # on a busy shared CPU

Results (figures, config, machine, versions) go to OUT.json (default
benchmarks/results/merge_policy.json); the merged models are deleted after measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SST2 = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
MAX_TOKENS = 64  # per example: keeps a training step to seconds on a laptop CPU
PROMPT = "Classify the sentiment of this movie review. Answer positive or negative.\n\n{text}"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps for the QLoRA adapter")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (high: few steps must move the model)")
    ap.add_argument("--batch", type=int, default=1, help="examples per step")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16", help="output dtypes to merge into")
    ap.add_argument("--data", type=Path, default=SST2, help="SST-2 train.tsv (label<TAB>sentence)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "merge_policy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default); 1 is far faster on a CPU shared with other jobs")
    return ap.parse_args()


def chat_examples(tok, path: Path, n: int, seed: int) -> list[list[int]]:
    """``n`` SST-2 rows as one-turn chats (chat template applied), short enough to fit MAX_TOKENS."""
    if not path.is_file():
        sys.exit(f"merge_policy: training text not found: {path} (pass --data)")
    rows = [line.split("\t", 1) for line in path.read_text().splitlines() if "\t" in line]
    random.Random(seed).shuffle(rows)
    out = []
    for label, text in rows:
        messages = [{"role": "user", "content": PROMPT.format(text=text.strip())},
                    {"role": "assistant", "content": "positive" if label.strip() == "1" else "negative"}]
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
        if len(ids) <= MAX_TOKENS:
            out.append(ids)
        if len(out) == n:
            return out
    sys.exit(f"merge_policy: only {len(out)} rows of {path} fit {MAX_TOKENS} tokens; need {n}")


def train_qlora(base: str, tok, args: argparse.Namespace, adapter: Path) -> dict:
    """A QLoRA adapter trained as `edgeft train --method qlora` does on CPU; returns the run record."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32",
             "quant_storage": "uint8", "blocksize": 64}
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.rank, lora_alpha=2 * args.rank,
                                             lora_dropout=0.05, target_modules="all-linear", bias="none"))
    examples = chat_examples(tok, args.data, args.steps * args.batch, args.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        batch = examples[step * args.batch:(step + 1) * args.batch]
        T = max(len(x) for x in batch)
        ids = torch.full((len(batch), T), tok.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(batch), T), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = labels[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss), 4))
        print(f"train step {step + 1}/{args.steps} loss {losses[-1]:.3f}", file=sys.stderr)
    shutil.rmtree(adapter, ignore_errors=True)
    model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    run = {"method": "qlora", "base_model": base, "quantization": quant,
           "benchmark": {"steps": args.steps, "rank": args.rank, "lr": args.lr, "batch": args.batch,
                         "first_loss": losses[0], "last_loss": losses[-1],
                         "train_seconds": round(time.perf_counter() - start, 1)}}
    (adapter / "edgeft-run.json").write_text(json.dumps(run, indent=2) + "\n")
    return run


def reference_rows(base: str, adapter: Path, tok) -> dict:
    """Scale: how far the adapter moved the 4-bit model; bnb's CPU bf16 inference kernel."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from edgeft.merge import encode_prompts, prompt_logits
    from edgeft.core.compare import compare_logits

    prompts = encode_prompts(tok)
    q = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    layers = [m for m in q.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    kernel = any(m.support_avx512bf16_for_cpu for m in layers)
    for m in layers:
        m.support_avx512bf16_for_cpu = False  # the path training takes: dequantize + fp32 matmul
    q4 = prompt_logits(q, prompts)
    qa = PeftModel.from_pretrained(q, str(adapter)).eval()
    q4_adapter = prompt_logits(qa, prompts)
    rows = {"adapter effect (4-bit base vs 4-bit base + adapter)": compare_logits(q4, q4_adapter)}
    if kernel:
        for m in layers:
            m.support_avx512bf16_for_cpu = True
        rows["bnb CPU inference kernel (bf16 activations) vs training path, 4-bit + adapter"] = compare_logits(
            q4_adapter, prompt_logits(qa, prompts))
    return rows


def machine() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def main() -> None:
    args = parse_args()
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    from edgeft.merge import merge_adapter
    from runtime.modelfiles import load_tokenizer

    from edgeft.models import resolve_model
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    base = resolve_model(None)
    args.out.mkdir(parents=True, exist_ok=True)
    adapter = args.out / "adapter"
    tok = load_tokenizer(base)
    run = train_qlora(base, tok, args, adapter)
    refs = reference_rows(base, adapter, tok)

    results = []
    for dtype in args.dtypes.split(","):
        for policy in ("nf4-dequant", "base"):
            start = time.perf_counter()
            record = merge_adapter(adapter, args.out / f"merged-{policy}-{dtype}", policy=policy, dtype=dtype, overwrite=True)
            fig = record.metrics["policies"][policy]
            results.append({"policy": policy, "dtype": dtype, "status": record.status,
                            "seconds": round(time.perf_counter() - start, 1),
                            **{k: fig[k] for k in ("top1_agreement", "mean_kl", "max_kl", "positions")},
                            "merge_vs_unmerged_same_weights": record.metrics["merge_vs_unmerged_same_weights"],
                            "checks": [c.__dict__ for c in record.checks]})
            shutil.rmtree(args.out / f"merged-{policy}-{dtype}", ignore_errors=True)  # 0.3-0.5 GB each
            if record.metrics["quantization_gap"]:
                refs["4-bit gap (fp32 base vs 4-bit base, no adapter)"] = record.metrics["quantization_gap"]

    print("\nmerged model (weights in DTYPE, computed in fp32) vs the unmerged 4-bit model as trained")
    print("| policy | dtype | top-1 agreement | mean KL | max KL | positions | record |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        print(f"| {r['policy']} | {r['dtype']} | {r['top1_agreement']:.3f} | {r['mean_kl']:.3g} | {r['max_kl']:.3g} "
              f"| {r['positions']} | {r['status']} |")
    print("\nreference rows")
    for name, fig in refs.items():
        print(f"- {name}: top-1 {fig['top1_agreement']:.3f}, mean KL {fig['mean_kl']:.3g}, max KL {fig['max_kl']:.3g}")
    out = args.out.with_name(args.out.name + ".json")
    out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out), "data": str(args.data)},
                               "training": run["benchmark"], "machine": machine(), "merges": results,
                               "reference_rows": refs}, indent=2, default=str) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
