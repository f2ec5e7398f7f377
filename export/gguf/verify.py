"""Verify a GGUF through llama.cpp against the Hugging Face tokenizer and the merged PyTorch model.

Checks: llama.cpp loads the file; it tokenises the samples exactly as the HF tokenizer does;
teacher-forced top-1 agreement and mean KL meet the type's bars (``QuantSpec``); and a greedy chat
continuation, whose common prefix with PyTorch's is reported without a bar. With the user's
evaluation rows (``export.evalrows``) the agreement bars are decided on those rows, the generic
sample texts are recorded beside them, and the task accuracy may not fall by more than 1 point
where the rows prove it (the paired 95% interval).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeft.core.errors import EdgeftError, one_line
from edgeft.core.records import Check
from export.evalrows import ANSWER_TOKENS, MAX_DROP, compare_on_rows, reference_answers
from export.gguf import tables as T
from export.gguf.llamacpp import captured_stderr, llama_threads


def verify_gguf(path: Path, model_dir: Path, spec: T.QuantSpec, hf_tok: Any = None,
                evals: Any = None) -> tuple[list[Check], dict[str, Any]]:
    """Compare the GGUF (through llama.cpp) with the HF tokenizer and the merged PyTorch model."""
    from runtime.backends import import_llama_cpp
    from runtime.modelfiles import load_tokenizer

    llama_cpp = import_llama_cpp()
    hf_tok = hf_tok if hf_tok is not None else load_tokenizer(str(model_dir))
    ref_model = _load_reference(model_dir)
    prompt_ids = _chat_prompt_ids(hf_tok)
    logit_ids = [hf_tok(t)["input_ids"] for t in T.LOGIT_SAMPLES] + [_chat_turn_ids(hf_tok)]
    longest_row = max((len(r.ids) + ANSWER_TOKENS for r in evals.rows), default=0) if evals is not None else 0
    n_ctx = max(256, max(len(x) for x in logit_ids), len(prompt_ids) + T.GREEDY_NEW_TOKENS, longest_row)
    n_ctx = (n_ctx + 63) // 64 * 64

    try:
        with captured_stderr():
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                  logits_all=True, verbose=False, n_threads=llama_threads(), seed=0)
    except Exception as e:  # llama-cpp-python raises ValueError for a file llama.cpp refuses
        return [Check("llama_cpp_loads", False, True, "==")], {"error": f"llama.cpp cannot load it: {one_line(e)}"}

    checks = [Check("llama_cpp_loads", True, True, "==")]
    metrics: dict[str, Any] = {}
    try:
        tok = metrics["tokenization"] = _compare_tokenization(llm, hf_tok)
        checks.append(Check("tokenizer_mismatches", tok["mismatches"], 0, "<="))
        logits = metrics["logits"] = _compare_teacher_forced(llm, ref_model, logit_ids)
        if evals is not None:  # the user's rows decide; the generic texts are recorded in "logits"
            logits = metrics["eval_rows"] = _compare_on_eval_rows(llm, ref_model, hf_tok, evals, model_dir)
        checks.append(Check("top1_agreement", round(logits["top1_agreement"], 4), spec.min_top1, ">="))
        checks.append(Check("mean_kl", round(logits["mean_kl"], 5), spec.max_mean_kl, "<="))
        if evals is not None:
            checks.append(Check("task_accuracy_supported_drop", round(logits["supported_drop"], 4), MAX_DROP, "<="))
        greedy = metrics["greedy"] = _compare_greedy(llm, ref_model, hf_tok, prompt_ids)
        checks.append(Check("greedy_match_tokens", greedy["matching_prefix"]))  # reported, no bar
    except Exception as e:  # a llama.cpp decode error is a verdict on the file, not a crash
        checks.append(Check("verification_completed", False, True, "=="))
        metrics["error"] = one_line(e)
    finally:
        llm.close()
    return checks, metrics


def _compare_on_eval_rows(llm: Any, ref_model: Any, hf_tok: Any, evals: Any, model_dir: Path) -> dict[str, Any]:
    """The merged model and llama.cpp on the user's rows (``export.evalrows``)."""
    def logits_of(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    def next_token(ids: list[int]) -> int:
        done = llm.n_tokens
        if 0 < done < len(ids) and list(llm.input_ids[:done]) == ids[:done]:
            llm.eval(ids[done:])  # continue the cached sequence
        else:
            llm.reset()
            llm.eval(ids)
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    ref = reference_answers(ref_model, hf_tok, evals, model_dir=model_dir)
    return compare_on_rows(ref, hf_tok, logits_of, next_token)


def _load_reference(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise EdgeftError(f"{model_dir}: cannot load the PyTorch reference model ({one_line(e)})") from None
    return model.eval()


def _chat_prompt_ids(hf_tok: Any) -> list[int]:
    messages = [{"role": "user", "content": T.CHAT_PROBE}]
    if getattr(hf_tok, "chat_template", None):
        return list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    return hf_tok(T.CHAT_PROBE)["input_ids"]


def _chat_turn_ids(hf_tok: Any) -> list[int]:
    """A whole chat exchange, so chat-format positions are part of the logit comparison."""
    messages = [{"role": "user", "content": "Give me two tips for a good night's sleep."},
                {"role": "assistant", "content": "Keep a regular schedule, and avoid screens for an hour before bed."}]
    if getattr(hf_tok, "chat_template", None):
        return list(hf_tok.apply_chat_template(messages, tokenize=True))
    return hf_tok(" ".join(m["content"] for m in messages))["input_ids"]


def _compare_tokenization(llm: Any, hf_tok: Any) -> dict[str, Any]:
    """llama.cpp vs HF token ids, with special tokens parsed and BOS/EOS added as each would."""
    samples = list(T.TOKENIZER_SAMPLES)
    if getattr(hf_tok, "chat_template", None):
        samples.append(hf_tok.apply_chat_template(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! ¿Qué tal? 🙂"}],
            add_generation_prompt=True, tokenize=False))
    mismatches: list[dict[str, Any]] = []
    for text in samples:
        ref = list(hf_tok(text, add_special_tokens=True)["input_ids"])
        got = list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
        if ref != got:
            mismatches.append({"text": text[:80], "hf": ref[:24], "llama_cpp": got[:24]})
    return {"samples": len(samples), "mismatches": len(mismatches), "examples": mismatches[:3]}


def _compare_teacher_forced(llm: Any, ref_model: Any, sequences: list[list[int]]) -> dict[str, Any]:
    """Logits of both models at every position of ``sequences`` (``edgeft.core.compare``)."""
    import torch

    from edgeft.core.compare import compare_logits

    refs, gots = [], []
    for ids in sequences:
        with torch.no_grad():
            refs.append(ref_model(torch.tensor([ids])).logits[0].float().numpy())
        llm.reset()
        llm.eval(ids)
        gots.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return compare_logits(np.concatenate(refs), np.concatenate(gots))


def _compare_greedy(llm: Any, ref_model: Any, hf_tok: Any, prompt: list[int]) -> dict[str, Any]:
    """Greedy continuation of a chat prompt by both models; the length of their common prefix."""
    import torch

    stop = {hf_tok.eos_token_id} | set(_as_list(getattr(ref_model.generation_config, "eos_token_id", None)))
    stop.discard(None)
    with torch.no_grad():
        out = ref_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=T.GREEDY_NEW_TOKENS, do_sample=False, eos_token_id=sorted(stop) or None,
                                 pad_token_id=hf_tok.pad_token_id)
    ref = out[0, len(prompt):].tolist()

    got: list[int] = []
    llm.reset()
    llm.eval(prompt)
    for _ in range(T.GREEDY_NEW_TOKENS):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(nxt)
        if nxt in stop:
            break
        llm.eval([nxt])
    match = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    return {"reference_tokens": len(ref), "matching_prefix": match,
            "reference_text": hf_tok.decode(ref), "gguf_text": hf_tok.decode(got)}


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]
