"""``edgeft demo``: the whole pipeline on the embedded default model and the built-in task.

Stages (each skipped when its output is already complete, so a re-run resumes):
task -> accuracy before -> QLoRA train -> accuracy after -> merge -> GGUF/ONNX export (verified).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edgeft.core.progress import say


def _accuracy(model_dir: str, adapter: Path | None, eval_file: Path, quant: dict | None) -> float:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from edgeft.core.rows import load_rows
    from edgeft.evaluate import exact_match, greedy_answers, prompts_and_answers
    from runtime.modelfiles import load_tokenizer

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


def demo_pipeline(output: Path, steps: int) -> "PipelineConfig":
    """The demo as a pipeline: QLoRA on the built-in task, merge, GGUF q4_k_m and ONNX int8, bench."""
    from edgeft.config import TrainConfig
    from edgeft.pipeline import PipelineConfig
    from edgeft.tasks import write_task

    train_file, eval_file = write_task(output / "task")
    train = TrainConfig(data=str(train_file), output=str(output / "adapter"), method="qlora", max_steps=steps,
                        batch_size=8, max_seq_len=128, lr=1e-3, lr_scheduler="cosine", warmup_steps=5, lora_r=16,
                        lora_alpha=32, eval_split=0.1, eval_every=20, save_every=20, seed=0)
    # Sized to finish on 2 CPU cores in about 10 minutes; `edgeft run` takes the full settings.
    return PipelineConfig(output=output, train=train, onnx=["int8"], gguf=["q4_k_m"], bench_data=str(eval_file),
                          bench_max_rows=32, bench_extra={"repeats": 2, "warmup": 1, "new_tokens": 64})


def run_demo(output: Path, *, steps: int = 40, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the demo pipeline into ``output``; returns the summary written to demo.json."""
    import shutil

    from edgeft.core.fsutil import write_json
    from edgeft.models import resolve_model
    from edgeft.pipeline import run_pipeline

    if overwrite and output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    summary_path = output / "demo.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    cfg = demo_pipeline(output, steps)
    base = resolve_model(None)
    summary["base_model"] = base
    if "accuracy_before" not in summary:
        say("[bold cyan]accuracy before fine-tuning[/] (embedded model, PyTorch fp32)")
        t = time.perf_counter()
        summary["accuracy_before"] = _accuracy(base, None, Path(cfg.bench_data), None)
        summary["seconds_accuracy_before"] = round(time.perf_counter() - t, 1)
        write_json(summary_path, summary)
    say(f"task accuracy before fine-tuning: {summary['accuracy_before']:.1%}")
    t = time.perf_counter()
    run_pipeline(cfg)
    summary["seconds_pipeline"] = round(time.perf_counter() - t, 1)
    report_path = output / "bench" / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        summary["artifacts"] = {e["name"]: {k: e.get(k) for k in ("kind", "size_bytes", "task_accuracy", "top1_agreement",
                                                                  "mean_kl", "decode_tokens_per_s", "flagged")}
                                for e in report["entries"]}
        summary["accuracy_after"] = report["entries"][0]["task_accuracy"]
    write_json(summary_path, summary)
    return summary
