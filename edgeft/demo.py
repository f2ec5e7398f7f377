"""``edgeft demo``: the whole pipeline on the embedded default model and the built-in task.

Stages (each skipped when its output is already complete, so a re-run resumes):
task -> accuracy before -> QLoRA train -> accuracy after -> merge -> GGUF/ONNX export (verified).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edgeft.progress import say


def _accuracy(model_dir: str, adapter: Path | None, eval_file: Path, quant: dict | None) -> float:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from edgeft.data import load_rows
    from edgeft.evaluate import exact_match, greedy_answers, prompts_and_answers
    from edgeft.models import load_tokenizer

    kw: dict[str, Any] = {"dtype": torch.float32}
    if quant:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant["quant_type"],
                                                       bnb_4bit_use_double_quant=quant["double_quant"],
                                                       bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    tok = load_tokenizer(str(adapter or model_dir))
    rows, _ = load_rows(eval_file)
    prompts, answers = prompts_and_answers(rows)
    preds = greedy_answers(model, tok, prompts)
    return exact_match(preds, answers)


def run_demo(output: Path, *, steps: int = 60, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the demo pipeline into ``output``; returns the summary written to demo.json."""
    from edgeft.config import TrainConfig
    from edgeft.fsutil import write_json
    from edgeft.models import resolve_model
    from edgeft.tasks import write_task

    output.mkdir(parents=True, exist_ok=True)
    summary_path = output / "demo.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() and not overwrite else {}
    timings = summary.setdefault("seconds", {})

    def stage(name: str, fn):
        if name in summary.get("done", []):
            say(f"[dim]{name}: done already[/]")
            return
        say(f"[bold cyan]== {name}[/]")
        t = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t, 1)
        summary.setdefault("done", []).append(name)
        write_json(summary_path, summary)

    train_file, eval_file = write_task(output / "task")
    base = resolve_model(None)
    summary["base_model"] = base
    run_dir = output / "adapter"

    def before():
        summary["accuracy_before"] = _accuracy(base, None, eval_file, None)
        say(f"task accuracy before fine-tuning: {summary['accuracy_before']:.1%}")

    def train_stage():
        from edgeft.train import train

        cfg = TrainConfig(data=str(train_file), output=str(run_dir), method="qlora", max_steps=steps, batch_size=8,
                          max_seq_len=128, lr=1e-3, lr_scheduler="cosine", warmup_steps=5, lora_r=16, lora_alpha=32,
                          eval_split=0.1, eval_every=20, save_every=20, seed=0)
        resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*/state.json"))
        res = train(cfg, resume=resume, overwrite=not resume)
        summary["train"] = {"steps": res.steps, "train_loss": res.train_loss, "eval_loss": res.eval_loss,
                            "tokens_per_s": round(res.tokens_per_s, 1)}

    def after():
        quant = json.loads((run_dir / "edgeft-run.json").read_text())["quantization"]
        summary["accuracy_after"] = _accuracy(base, run_dir, eval_file, quant)
        say(f"task accuracy after fine-tuning (4-bit base + adapter): {summary['accuracy_after']:.1%}")

    stage("accuracy before", before)
    stage("train", train_stage)
    stage("accuracy after", after)
    for name, fn in _later_stages(output, run_dir, summary):
        stage(name, fn)
    write_json(summary_path, summary)
    return summary


def _later_stages(output: Path, run_dir: Path, summary: dict[str, Any]):
    """Merge and export stages (verified artifacts)."""
    merged = output / "merged"

    def merge():
        from edgeft.merge import merge_adapter

        rec = merge_adapter(run_dir, merged, overwrite=True)
        summary["merge"] = {"status": rec.status, "summary": rec.summary()}
        say(f"merged: {rec.summary()}")

    def gguf():
        from export.gguf import export_gguf

        rec = export_gguf(merged, output / "model.q4_k_m.gguf", qtype="q4_k_m", overwrite=True)
        summary["gguf_q4_k_m"] = {"status": rec.status, "summary": rec.summary()}
        say(f"GGUF q4_k_m: {rec.summary()}")

    def onnx():
        from export.onnx import export_onnx

        rec = export_onnx(merged, output / "onnx-int8", quantize="int8", overwrite=True)
        summary["onnx_int8"] = {"status": rec.status, "summary": rec.summary()}
        say(f"ONNX int8: {rec.summary()}")

    return [("merge", merge), ("export gguf q4_k_m", gguf), ("export onnx int8", onnx)]
