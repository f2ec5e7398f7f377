"""Verify a GGUF LoRA adapter: the base GGUF with the adapter applied in llama.cpp, against the PyTorch
base with the PEFT adapter merged (fp32), teacher-forced over the GGUF exporter's samples.

Checks: llama.cpp loads the adapter onto the base; top-1 agreement and mean KL meet the bars of the
base's own type (``export.gguf.tables.QUANT_TYPES``). Reported without a bar: the same figures
for the base alone, which show how much the adapter moves the model. With the user's evaluation
rows (``export.evalrows``) the agreement bars are decided on those rows, and the task accuracy of
the base + adapter may not fall below the merged model's by more than 1 point where the rows prove
it (the paired 95% interval), as for the other exports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeft.core.compare import compare_logits
from edgeft.core.errors import EdgeftError, one_line
from edgeft.core.records import Check
from export.evalrows import ANSWER_TOKENS, MAX_DROP, compare_on_rows, reference_answers
from export.gguf import tables as T
from export.gguf.llamacpp import captured_stderr, llama_threads
from export.gguf.verify import _chat_turn_ids
from export.gguf_lora.plan import LoraPlan

ADAPTER_NAME = "task"


def reference_tokenizer(plan: LoraPlan) -> Any:
    """The tokenizer saved with the adapter (else its base model's)."""
    from runtime.modelfiles import load_tokenizer

    return load_tokenizer(str(plan.adapter if (plan.adapter / "tokenizer.json").is_file() else plan.base_model))


def verify_lora_gguf(plan: LoraPlan, path: Path, tok: Any, evals: Any = None) -> tuple[list[Check], dict[str, Any]]:
    """Checks and figures for the adapter file at ``path`` (not yet under its final name); ``evals``: the
    user's rows (``export.evalrows.load_eval_rows``), which then decide."""
    from runtime.backends import GgufBackend

    spec = T.QUANT_TYPES[plan.base_type]
    sequences = [tok(t)["input_ids"] for t in T.LOGIT_SAMPLES] + [_chat_turn_ids(tok)]
    model = _merged_reference(plan)
    reference = np.concatenate(_logits(model, sequences))
    longest_row = max((len(r.ids) + ANSWER_TOKENS for r in evals.rows), default=0) if evals is not None else 0
    n_ctx = (max(max(len(s) for s in sequences), longest_row) + 63) // 64 * 64
    with captured_stderr():
        backend = GgufBackend(plan.base_gguf, threads=llama_threads(), n_ctx=n_ctx)
    try:
        try:
            with captured_stderr():
                backend.load_adapter(ADAPTER_NAME, path)
        except EdgeftError as e:
            return [Check("llama_cpp_loads_adapter", False, True, "==")], {"error": e.format_message()}
        with_adapter, base_only = [], []
        for name, out in ((ADAPTER_NAME, with_adapter), (None, base_only)):
            backend.use_adapter(name)
            out += [backend.logits(ids) for ids in sequences]
        rows = _compare_on_rows(backend, model, tok, evals) if evals is not None else None
    except Exception as e:  # a llama.cpp decode error is a verdict on the file, not a crash
        return [Check("verification_completed", False, True, "==")], {"error": one_line(e)}
    finally:
        backend.close()
    metrics: dict[str, Any] = {"logits": compare_logits(reference, np.concatenate(with_adapter)),
                               "base_without_adapter": compare_logits(reference, np.concatenate(base_only))}
    decided = metrics["logits"]
    if rows is not None:  # the user's rows decide; the generic texts stay recorded in "logits"
        decided = metrics["eval_rows"] = rows
    checks = [Check("llama_cpp_loads_adapter", True, True, "=="),
              Check("top1_agreement", round(decided["top1_agreement"], 4), spec.min_top1, ">="),
              Check("mean_kl", round(decided["mean_kl"], 5), spec.max_mean_kl, "<=")]
    if rows is not None:
        checks.append(Check("task_accuracy_supported_drop", round(rows["supported_drop"], 4), MAX_DROP, "<="))
    return checks, metrics


def _compare_on_rows(backend: Any, model: Any, tok: Any, evals: Any) -> dict[str, Any]:
    """The base GGUF + adapter against the merged model on the user's rows: agreement, task accuracy of
    greedy answers and its paired difference (``export.evalrows.compare_on_rows``)."""
    backend.use_adapter(ADAPTER_NAME)
    ref = reference_answers(model, tok, evals)

    def next_token(ids: list[int]) -> int:  # the greedy loop extends ids by one: the cache holds the rest
        return int(np.argmax(backend.prefill_reusing(ids)[0]))

    return compare_on_rows(ref, tok, backend.logits, next_token)


def _merged_reference(plan: LoraPlan) -> Any:
    """The PyTorch base with the adapter merged, fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        base = AutoModelForCausalLM.from_pretrained(plan.base_model, dtype=torch.float32, local_files_only=True)
        return PeftModel.from_pretrained(base, str(plan.adapter)).merge_and_unload().eval()
    except Exception as e:  # transformers and peft raise many types for unloadable inputs
        raise EdgeftError(f"{plan.adapter}: cannot load the PyTorch reference ({one_line(e)})") from None


def _logits(model: Any, sequences: list[list[int]]) -> list[np.ndarray]:
    """(T, V) logits of each sequence."""
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in sequences]
