"""Verify a GenAI folder as a phone app runs it: logits and cached steps through ``onnxruntime_genai``'s
generator against the PyTorch reference, greedy generation by GenAI's own search loop, GenAI's tokenizer
and chat template against the Hugging Face ones, and the stop ids it will honour."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from edgeft.core.errors import EdgeftError
from edgeft.core.records import Check
from export.drive import BackendLM
from export.onnx.reference import CHAT_SAMPLE, SAMPLE_TEXTS, Reference
from export.onnx.verify import Bars, graph_checks, graph_figures, tokenizer_matches
from runtime.backends.genai_backend import GenaiBackend
from runtime.mobile import GENAI_CONFIG

VERIFY_THREADS = 1  # tiny and small models: one thread is as fast and leaves the machine to others


def verify_genai(directory: Path, refs: Sequence[Reference], bars: Bars, *,
                 tokenizer: Any) -> tuple[list[Check], dict[str, Any]]:
    """Compare the GenAI folder in ``directory`` with the PyTorch reference; (checks, figures)."""
    figures = measure_genai(directory, refs, tokenizer)
    return judge_genai(figures, bars), figures


def measure_genai(directory: Path, refs: Sequence[Reference], tokenizer: Any) -> dict[str, Any]:
    longest = max(len(r.prompt) + len(r.continuation) for r in refs)
    try:
        backend = GenaiBackend(directory, threads=VERIFY_THREADS, max_tokens=longest + 8)
    except EdgeftError as e:
        return {"error": e.format_message()}
    figures = graph_figures(BackendLM(backend), refs, pad=0)
    figures["genai_generate"] = _generate(backend, refs)
    figures["genai_tokenizer"] = _genai_tokenizer(backend, tokenizer)
    figures["tokenizer_roundtrip"] = tokenizer_matches(directory, tokenizer)
    figures["stop_ids"] = json.loads((directory / GENAI_CONFIG).read_text())["model"]["eos_token_id"]
    backend.close()
    return figures


def _generate(backend: GenaiBackend, refs: Sequence[Reference]) -> dict[str, Any]:
    """GenAI's own greedy search against PyTorch's continuation (up to a stop id where it ends there)."""
    matched = 0
    for r in refs:
        new = backend.generate(r.prompt, len(r.continuation))
        matched += int(new == r.continuation[: len(new)] and len(new) > 0)
    return {"generated": True, "matches_reference": matched == len(refs), "matching_samples": f"{matched}/{len(refs)}"}


def _genai_tokenizer(backend: GenaiBackend, tokenizer: Any) -> dict[str, Any]:
    """GenAI's tokenizer encodes the sample texts and renders the chat template as Hugging Face does."""
    og_tok = backend.og.Tokenizer(backend.model)
    texts = [t for _, t in SAMPLE_TEXTS]
    encodes = all(list(og_tok.encode(t)) == list(tokenizer(t)["input_ids"]) for t in texts)
    chat = None
    if getattr(tokenizer, "chat_template", None):
        want = tokenizer.apply_chat_template(CHAT_SAMPLE, tokenize=False, add_generation_prompt=True)
        got = og_tok.apply_chat_template(json.dumps(CHAT_SAMPLE), add_generation_prompt=True)
        chat = got == want
        encodes = encodes and list(og_tok.encode(want)) == list(tokenizer(want, add_special_tokens=False)["input_ids"])
    return {"encodes_like_hf": encodes, "chat_template_matches": chat,
            "eos_token_ids": [int(i) for i in og_tok.eos_token_ids]}


def judge_genai(figures: dict[str, Any], bars: Bars) -> list[Check]:
    """The checks a GenAI folder's figures must pass (pure)."""
    if "logits" not in figures:
        return [Check("genai_loads", False, True, "==")]
    checks = graph_checks(figures, bars)
    gen, tok = figures["genai_generate"], figures["genai_tokenizer"]
    if bars.greedy_exact:
        checks.append(Check("genai_greedy_match", gen["matches_reference"], True, "=="))
    else:
        checks.append(Check("genai_generates", gen["generated"], True, "=="))
    checks.append(Check("genai_tokenizer_matches", tok["encodes_like_hf"], True, "=="))
    if tok["chat_template_matches"] is not None:
        checks.append(Check("genai_chat_template_matches", tok["chat_template_matches"], True, "=="))
    checks.append(Check("genai_stop_ids", set(figures["stop_ids"]) <= set(tok["eos_token_ids"]), True, "=="))
    checks.append(Check("tokenizer_roundtrip", figures["tokenizer_roundtrip"], True, "=="))
    return checks
