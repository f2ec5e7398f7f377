"""The PyTorch side of the verification: load the source model in fp32 and record, for a few sample
texts, its greedy continuation and its logits, which every exported variant is compared against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeft.core.errors import EdgeftError, one_line

# Sample texts: prose, code and facts, plus a chat-formatted prompt built with the tokenizer's template.
# Positions are cheap (one forward pass); greedy steps are not, so the prompts are long-ish.
SAMPLE_TEXTS: tuple[tuple[str, str], ...] = (
    ("prose", "The old lighthouse keeper climbed the narrow stairs every evening, lit the lamp, and watched "
              "the fishing boats return to the harbour before the storm. One night he noticed that"),
    ("code", "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n"
             "        return n\n    a, b = 0, 1\n    for _ in range(n - 1):\n        a, b ="),
    ("facts", "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees. The largest planet "
              "in the solar system is Jupiter, and the capital of France is"),
)
CHAT_SAMPLE = [{"role": "user", "content": "Give me three short tips for saving energy at home."}]
GREEDY_TOKENS = 16  # continuation length for the KV-cache check


def load_torch(model_dir: Path) -> Any:
    """The model in ``model_dir`` in fp32, in eval mode (safetensors only, no remote code)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, use_safetensors=True, local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # transformers raises many types for unreadable checkpoints
        raise EdgeftError(f"--model {model_dir}: cannot load the model: {one_line(e)}") from None
    return model.eval()


@dataclass
class Sample:
    name: str
    prompt: list[int]


def sample_prompts(tokenizer: Any) -> list[Sample]:
    """Token ids of the sample texts and, where the tokenizer has a chat template, a chat prompt."""
    samples = [Sample(name, tokenizer(text)["input_ids"]) for name, text in SAMPLE_TEXTS]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(CHAT_SAMPLE, tokenize=False, add_generation_prompt=True)
        samples.append(Sample("chat", tokenizer(text, add_special_tokens=False)["input_ids"]))
    return [s for s in samples if s.prompt]


@dataclass
class Reference:
    """PyTorch's view of one sample: greedy continuation and logits over prompt + continuation."""

    name: str
    prompt: list[int]
    continuation: list[int]
    logits: np.ndarray  # (len(prompt) + len(continuation), V) float32

    @property
    def step_logits(self) -> np.ndarray:
        """Logits that predict each continuation token: (len(continuation), V)."""
        p = len(self.prompt)
        return self.logits[p - 1 : p - 1 + len(self.continuation)]


def torch_reference(model: Any, samples: Sequence[Sample], n_new: int) -> list[Reference]:
    """Greedy-decode ``n_new`` tokens after each sample with PyTorch's own cache, then take the logits
    of prompt + continuation in one pass; non-finite logits mean damaged weights and raise."""
    import torch

    refs = []
    with torch.inference_mode():
        for s in samples:
            ids, past, cont = torch.tensor([s.prompt]), None, []
            for _ in range(n_new):  # greedy with PyTorch's own cache, the reference continuation
                out = model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                cont.append(int(out.logits[0, -1].argmax()))
                ids = torch.tensor([[cont[-1]]])
            logits = model(input_ids=torch.tensor([s.prompt + cont]), use_cache=False).logits[0]
            logits = logits.float().numpy()  # (T, V)
            if not np.isfinite(logits).all():
                raise EdgeftError("the PyTorch model produces non-finite logits; its weights are damaged")
            refs.append(Reference(s.name, s.prompt, cont, logits))
    return refs
