"""Task accuracy of a PyTorch model: greedy answers through the chat template, exact match."""

from __future__ import annotations

from typing import Any

from edgeft.core.rows import Row
from edgeft.core.answers import normalise_answer


def prompts_and_answers(rows: list[Row]) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Chat prompts (everything before the last assistant turn) and reference answers."""
    prompts, answers = [], []
    for r in rows:
        if r.messages is None:
            continue
        last = max(i for i, m in enumerate(r.messages) if m["role"] == "assistant")
        prompts.append(r.messages[:last])
        answers.append(r.messages[last]["content"])
    return prompts, answers


def greedy_answers(model: Any, tok: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int = 8,
                   batch_size: int = 16) -> list[str]:
    import torch

    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[i : i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                  return_token_type_ids=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def exact_match(predictions: list[str], answers: list[str]) -> float:
    hits = sum(normalise_answer(p) == normalise_answer(a) for p, a in zip(predictions, answers))
    return hits / max(1, len(answers))
