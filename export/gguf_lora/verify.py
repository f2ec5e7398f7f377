"""Verify a GGUF LoRA adapter: the base GGUF with the adapter applied in llama.cpp, against the PyTorch
base with the PEFT adapter merged (fp32), teacher-forced over the GGUF exporter's samples.

Checks: llama.cpp loads the adapter onto the base; top-1 agreement and mean KL meet the bars of the
base's own type (``export.gguf.tables.QUANT_TYPES``). Reported without a bar: the same figures
for the base alone, which show how much the adapter moves the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeft.core.compare import compare_logits
from edgeft.core.errors import EdgeftError, one_line
from edgeft.core.records import Check
from export.gguf import tables as T
from export.gguf.llamacpp import captured_stderr, llama_threads
from export.gguf.verify import _chat_turn_ids
from export.gguf_lora.plan import LoraPlan

ADAPTER_NAME = "task"


def verify_lora_gguf(plan: LoraPlan, path: Path) -> tuple[list[Check], dict[str, Any]]:
    """Checks and figures for the adapter file at ``path`` (not yet under its final name)."""
    from runtime.backends import GgufBackend
    from runtime.modelfiles import load_tokenizer

    spec = T.QUANT_TYPES[plan.base_type]
    tok = load_tokenizer(str(plan.adapter if (plan.adapter / "tokenizer.json").is_file() else plan.base_model))
    sequences = [tok(t)["input_ids"] for t in T.LOGIT_SAMPLES] + [_chat_turn_ids(tok)]
    reference = np.concatenate(_reference_logits(plan, sequences))
    n_ctx = (max(len(s) for s in sequences) + 63) // 64 * 64
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
    except Exception as e:  # a llama.cpp decode error is a verdict on the file, not a crash
        return [Check("verification_completed", False, True, "==")], {"error": one_line(e)}
    finally:
        backend.close()
    got = compare_logits(reference, np.concatenate(with_adapter))
    without = compare_logits(reference, np.concatenate(base_only))
    checks = [Check("llama_cpp_loads_adapter", True, True, "=="),
              Check("top1_agreement", round(got["top1_agreement"], 4), spec.min_top1, ">="),
              Check("mean_kl", round(got["mean_kl"], 5), spec.max_mean_kl, "<=")]
    return checks, {"logits": got, "base_without_adapter": without}


def _reference_logits(plan: LoraPlan, sequences: list[list[int]]) -> list[np.ndarray]:
    """(T, V) logits of each sequence from the PyTorch base with the adapter merged, fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        base = AutoModelForCausalLM.from_pretrained(plan.base_model, dtype=torch.float32, local_files_only=True)
        model = PeftModel.from_pretrained(base, str(plan.adapter)).merge_and_unload().eval()
    except Exception as e:  # transformers and peft raise many types for unloadable inputs
        raise EdgeftError(f"{plan.adapter}: cannot load the PyTorch reference ({one_line(e)})") from None
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in sequences]
