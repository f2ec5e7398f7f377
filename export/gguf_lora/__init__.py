"""Export a PEFT LoRA adapter as a llama.cpp GGUF adapter (task adapters on one quantized base), verified.

``export_gguf_lora`` runs the stages in order, one module each:

- ``plan.py``: the adapter's config and tensors, its base model's config, the verified base GGUF;
  every lora_A/lora_B pair mapped to the base tensor it adapts, all problems at once;
- ``write.py``: the adapter file in llama.cpp's format (``general.type = adapter``,
  ``adapter.type = lora``, ``adapter.lora.alpha``, ``blk.N.*.weight.lora_a / .lora_b``);
- ``verify.py``: the base GGUF + adapter in llama.cpp against the PyTorch base with the adapter
  merged (teacher-forced top-1 and KL, the base type's bars; with ``eval_data``, decided on the
  user's rows, with the task accuracy of both and its paired interval).

The record is written next to the file (``TASK.lora.gguf.verify.json``); the file is written,
verified and recorded under a temporary name, then renamed into place, as for ``export.gguf``.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgeft.core.errors import EdgeftError
from edgeft.core.fsutil import atomic_file
from edgeft.core.progress import say
from edgeft.core.records import Record, write_record
from export.evalrows import load_eval_rows
from export.gguf_lora.plan import LoraPlan, plan_lora_export
from export.gguf_lora.verify import reference_tokenizer, verify_lora_gguf
from export.gguf_lora.write import write_lora_gguf

__all__ = ["export_gguf_lora"]


def export_gguf_lora(adapter: Path, base_gguf: Path, output: Path, *, overwrite: bool = False,
                     eval_data: Path | None = None) -> Record:
    """Write ``output`` (a GGUF LoRA adapter for ``base_gguf``), verify it, and record the verdict beside it.

    ``eval_data``: the user's evaluation rows; verification then decides on them (agreement and task
    accuracy against the merged PyTorch model). Bad rows fail before any file is written.
    """
    t0 = time.perf_counter()
    if eval_data is not None and not Path(eval_data).is_file():
        raise EdgeftError(f"--eval-data {eval_data}: file not found")
    plan = plan_lora_export(Path(adapter), Path(base_gguf), Path(output), overwrite)
    tok = reference_tokenizer(plan)
    evals = load_eval_rows(eval_data, tok) if eval_data is not None else None
    with atomic_file(plan.output) as tmp:
        say(f"writing {plan.output.name}: {len(plan.pairs)} LoRA pairs, rank {plan.rank}")
        write_lora_gguf(plan, tmp)
        say(f"verifying {plan.output.name} on {plan.base_gguf.name} against the merged PyTorch model")
        checks, metrics = verify_lora_gguf(plan, tmp, tok, evals)
        record = _record(plan, tmp, checks, metrics, time.perf_counter() - t0)
        write_record(plan.output, record, data=tmp)
    return record


def _record(plan: LoraPlan, path: Path, checks: list, metrics: dict, seconds: float) -> Record:
    return Record(
        artifact=str(plan.output), kind="gguf-lora", reference=f"{plan.base_model} + {plan.adapter} (merged, fp32)",
        checks=checks,
        metrics={"base_gguf": str(plan.base_gguf), "base_type": plan.base_type, "adapter": str(plan.adapter),
                 "rank": plan.rank, "alpha": plan.alpha, "pairs": len(plan.pairs),
                 "file_size_bytes": path.stat().st_size, **metrics, "timings_s": {"total_s": round(seconds, 2)}},
    )
