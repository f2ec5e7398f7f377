"""Verify an exported variant against the PyTorch reference: run it with plain onnxruntime (whole
sequences and cached decode steps) and through optimum's generate, check the saved tokenizer, and
judge the figures against the variant's bars."""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeft.core.compare import compare_logits
from edgeft.core.errors import EdgeftError, one_line
from edgeft.core.records import Check
from export.evalrows import MAX_DROP, compare_on_rows
from export.onnx.reference import SAMPLE_TEXTS, Reference
from export.onnx.write import ONNX_NAME
from runtime.modelfiles import load_tokenizer


@dataclass(frozen=True)
class Bars:
    """What a variant must meet against the PyTorch fp32 reference (all sample positions)."""

    top1: float  # minimum top-1 agreement, whole sequences and cached decode steps alike
    mean_kl: float  # maximum mean KL(PyTorch || ONNX) in nats
    atol: float | None = None  # maximum |logit difference|; only where numerical equality is expected
    greedy_exact: bool = False  # cached greedy continuation must equal PyTorch's, token for token
    # size / fp32 size: catches a quantizer that silently did nothing. Loose on purpose: on a tiny
    # model the embedding (kept fp16) dominates; SmolLM2-135M measures fp16 0.50, int8 0.39, int4 0.32.
    max_size_ratio: float | None = None


# Bars, measured on SmolLM2-135M-Instruct (fp32 weights dequantized from its Q4_1 GGUF), 525
# positions of 14 texts (figures in quantize.py's docstring).
# - fp32 differs from PyTorch by operator order only: max |logit diff| 2e-4 (logits ~30), 1e-5 on the
#   tiny test models. 1e-3 leaves headroom without hiding a real error: a wrong mask or cache slot
#   moves logits by whole units.
# - Top-1 agreement of quantized variants is bounded by near-ties, not quality: 19 of the 22 positions
#   where 8-bit weights changed the argmax had a top-2 margin under 0.1 logit (10% of all positions have
#   a margin under 0.15). So the top-1 bars sit below the starting bars (int8 0.98) and
#   mean KL carries the weight: int8 measured top-1 0.95-0.96 / KL 0.005, int4 0.96-0.97 / KL 0.004.
#   A broken variant is far away: quantize_dynamic int8 0.56 / 0.74, round-to-nearest int4 0.67 / 0.45.
BARS: dict[str, Bars] = {
    "fp32": Bars(top1=0.99, mean_kl=1e-4, atol=1e-3, greedy_exact=True),
    "fp16": Bars(top1=0.98, mean_kl=1e-3, max_size_ratio=0.6),
    "int8": Bars(top1=0.93, mean_kl=0.02, max_size_ratio=0.85),
    "int4": Bars(top1=0.90, mean_kl=0.05, max_size_ratio=0.85),
}


class OrtLM:
    """Drive an exported decoder with plain ``onnxruntime`` (batch-first, left padding; the
    interface in the package docstring)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_kv_order)
        if not self.past_names:
            raise EdgeftError(f"{path}: the graph has no past_key_values inputs (exported without KV cache)")
        shape = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.kv_dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32
        self.has_position_ids = "position_ids" in inputs
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype) for n in self.past_names}

    def step(self, ids: np.ndarray, mask: np.ndarray,
             past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One call: ids (B, T), mask (B, past + T) → logits (B, T, V) and the new past."""
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), **past}
        if self.has_position_ids:
            pos = np.cumsum(mask, axis=1) - 1
            feed["position_ids"] = np.where(mask > 0, pos, 1)[:, -ids.shape[1]:].astype(np.int64)
        outs = dict(zip(self.output_names, self.session.run(None, feed)))
        present = {n: outs[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return outs["logits"], present

    def logits(self, seqs: Sequence[Sequence[int]], pad_id: int) -> list[np.ndarray]:
        """Full-sequence logits for a left-padded batch (no cache): one (T_i, V) array per sequence."""
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), pad_id, np.int64)
        mask = np.zeros((len(seqs), width), np.int64)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
        logits, _ = self.step(ids, mask, self.empty_past(len(seqs)))
        return [logits[i, width - len(s):].astype(np.float32) for i, s in enumerate(seqs)]

    def cached_steps(self, prompt: Sequence[int], forced: Sequence[int]) -> np.ndarray:
        """Prefill ``prompt``, then feed ``forced`` one token at a time through the cache.

        Returns the logits that predict each forced token: (len(forced), V).
        """
        ids = np.array([prompt], np.int64)
        mask = np.ones_like(ids)
        logits, past = self.step(ids, mask, self.empty_past(1))
        rows = [logits[0, -1]]
        for tok in forced[:-1]:
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            logits, past = self.step(np.array([[tok]], np.int64), mask, past)
            rows.append(logits[0, -1])
        return np.stack(rows).astype(np.float32)


def _kv_order(name: str) -> tuple[int, str]:
    _, layer, kind = name.split(".")  # past_key_values.{i}.{key|value}
    return int(layer), kind


def verify_variant(onnx_dir: Path, refs: Sequence[Reference], bars: Bars, *,
                   tokenizer: Any, eval_ref: Any = None) -> tuple[list[Check], dict[str, Any]]:
    """Compare the ONNX model in ``onnx_dir`` with the PyTorch reference; (checks, figures).

    ``eval_ref`` (``export.evalrows.ReferenceAnswers``): the user's rows, which then decide the
    agreement bars; the sample texts' figures stay in the record beside them.
    """
    figures = measure(onnx_dir, refs, tokenizer, eval_ref)
    return judge(figures, bars), figures


def measure(onnx_dir: Path, refs: Sequence[Reference], tokenizer: Any, eval_ref: Any = None) -> dict[str, Any]:
    """Run the ONNX model on the reference samples: whole sequences, cached decode steps, optimum generate."""
    figures: dict[str, Any] = {"samples": [{"name": r.name, "prompt_tokens": len(r.prompt)} for r in refs],
                               "greedy_tokens": len(refs[0].continuation) if refs else 0}
    try:
        lm = OrtLM(onnx_dir / ONNX_NAME)
    except EdgeftError:
        raise
    except Exception as e:  # e.g. an op without a CPU kernel for this dtype
        figures["error"] = f"onnxruntime (CPU) cannot load the model: {one_line(e)}"
        return figures
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    figures.update(graph_figures(lm, refs, pad))
    if eval_ref is not None:
        figures["eval_rows"] = compare_on_rows(eval_ref, tokenizer, lambda ids: lm.logits([ids], pad)[0],
                                               lambda ids: int(lm.logits([ids], pad)[0][-1].argmax()))
    del lm
    gc.collect()
    figures["optimum"] = _optimum_generate(onnx_dir, refs)
    figures["tokenizer_roundtrip"] = tokenizer_matches(onnx_dir, tokenizer)
    return figures


def graph_figures(lm: Any, refs: Sequence[Reference], pad: int) -> dict[str, Any]:
    """A loaded graph against the reference: whole sequences and cached decode steps."""
    figures: dict[str, Any] = {}
    # Whole sequences (prompt + PyTorch's continuation), one left-padded batch, no cache.
    onnx_all = np.concatenate(lm.logits([r.prompt + r.continuation for r in refs], pad))
    figures["logits"] = compare_logits(np.concatenate([r.logits for r in refs]), onnx_all)
    figures["logits_finite"] = bool(np.isfinite(onnx_all).all())
    # Cached decoding: prefill the prompt, then feed the continuation one token at a time.
    steps = [lm.cached_steps(r.prompt, r.continuation) for r in refs]
    figures["kv_cache"] = compare_logits(np.concatenate([r.step_logits for r in refs]), np.concatenate(steps))
    greedy = [s.argmax(-1).tolist() == r.continuation for s, r in zip(steps, refs)]
    figures["kv_cache"]["greedy_match"] = all(greedy)
    figures["kv_cache"]["greedy_match_samples"] = f"{sum(greedy)}/{len(greedy)}"
    return figures


def judge(figures: dict[str, Any], bars: Bars) -> list[Check]:
    """The checks a variant's figures must pass (pure)."""
    if "logits" not in figures:
        return [Check("onnxruntime_loads", False, True, "==")]
    opt = figures["optimum"]
    checks = graph_checks(figures, bars)
    if opt.get("skipped"):  # a known gap of optimum's runtime class; the graph is checked above
        pass
    elif bars.greedy_exact:
        checks.append(Check("optimum_greedy_match", opt["matches_reference"], True, "=="))
    else:
        checks.append(Check("optimum_generates", opt["generated"], True, "=="))
    checks.append(Check("tokenizer_roundtrip", figures["tokenizer_roundtrip"], True, "=="))
    return checks


KV_BROKEN_BELOW = 0.5  # cached-step top-1 of a graph whose cache inputs are wired wrongly is near chance


def graph_checks(figures: dict[str, Any], bars: Bars) -> list[Check]:
    """The checks on ``graph_figures``' whole-sequence and cached-step figures (pure)."""
    full, kv = figures["logits"], figures["kv_cache"]
    rows = figures.get("eval_rows")
    decide = rows or full  # the user's rows decide when they are known; the sample texts otherwise
    checks = [
        Check("logits_finite", figures["logits_finite"], True, "=="),
        Check("top1_agreement", decide["top1_agreement"], bars.top1, ">="),
        Check("mean_kl", decide["mean_kl"], bars.mean_kl, "<="),
        # with the user's rows deciding, the cached-step check only has to catch a broken cache
        Check("kv_top1_agreement", kv["top1_agreement"], bars.top1 if rows is None else KV_BROKEN_BELOW, ">="),
    ]
    if rows is not None:
        checks.append(Check("task_accuracy_supported_drop", round(rows["supported_drop"], 4), MAX_DROP, "<="))
    if bars.atol is not None:
        checks += [Check("max_abs_diff", full["max_abs_diff"], bars.atol, "<="),
                   Check("kv_max_abs_diff", kv["max_abs_diff"], bars.atol, "<=")]
    if bars.greedy_exact:
        checks.append(Check("kv_greedy_match", kv["greedy_match"], True, "=="))
    return checks


# Why optimum's ORTModelForCausalLM cannot run a graph with its cache although onnxruntime can (the
# graph itself passed the whole-sequence and cached-step checks above). optimum-onnx 0.1.0,
# onnxruntime/modeling_decoder.py sizes the empty first cache from the config, and
# - uses num_attention_heads, not num_key_value_heads, outside its grouped-query list (phi3 is not on it);
# - uses hidden_size / num_attention_heads as the head size outside its head_dim list (qwen3 is not on
#   it: Qwen3-0.6B has head_dim 128 but 1024 / 16 = 64).
OPTIMUM_GQA_TYPES = {"arcee", "deepseek_v3", "cohere", "gemma", "gemma3_text", "glm", "granite", "gpt_oss", "helium",
                     "mistral", "llama", "nemotron", "qwen2", "qwen3", "qwen3_moe", "smollm3", "stablelm"}
OPTIMUM_HEAD_DIM_TYPES = {"gemma", "gemma3_text", "gpt_oss", "nemotron"}


def optimum_runtime_gap(config: dict[str, Any]) -> str | None:
    """Why optimum 0.1.0's generate cannot run this export (a known gap), or None."""
    model_type = config.get("model_type", "")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if kv not in (None, heads) and model_type not in OPTIMUM_GQA_TYPES:
        return (f"optimum-onnx 0.1.0 sizes a {model_type} model's first cache with num_attention_heads ({heads}), not "
                f"num_key_value_heads ({kv}); onnxruntime and edgeft's runtime run it")
    head_dim = config.get("head_dim")
    derived = config.get("hidden_size", 0) // heads if heads else None
    if head_dim and derived and head_dim != derived and model_type not in OPTIMUM_HEAD_DIM_TYPES:
        return (f"optimum-onnx 0.1.0 sizes a {model_type} model's cache with hidden_size / heads ({derived}), "
                f"not head_dim ({head_dim}); onnxruntime and edgeft's runtime run it")
    return None


def _optimum_generate(onnx_dir: Path, refs: Sequence[Reference]) -> dict[str, Any]:
    """Load with ORTModelForCausalLM and greedy-generate with its cache; compare with PyTorch's tokens."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import GenerationConfig

    gap = optimum_runtime_gap(json.loads((onnx_dir / "config.json").read_text()))
    if gap:
        return {"generated": None, "matches_reference": None, "skipped": gap}
    try:
        model = ORTModelForCausalLM.from_pretrained(onnx_dir, use_cache=True, use_io_binding=False,
                                                    provider="CPUExecutionProvider")
    except Exception as e:
        return {"generated": False, "matches_reference": False, "error": one_line(e)}
    n = len(refs[0].continuation) if refs else 0
    # No end-of-sequence stop: the reference continuation is raw argmax for exactly n tokens.
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=0, do_sample=False, eos_token_id=None,
                              pad_token_id=model.config.pad_token_id or 0)
    matched, prefix, total = 0, 0, 0
    try:
        for r in refs:
            ids = torch.tensor([r.prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            new = out[0, len(r.prompt):].tolist()
            # generate() may still stop at the model's own end-of-sequence tokens (its generation
            # config fills fields left unset): then the tokens up to that stop must match.
            ref = r.continuation[: len(new)] if len(new) < n and new and new[-1] in _stop_ids(model) else r.continuation
            matched += int(new == ref)
            prefix += next((i for i, (a, b) in enumerate(zip(new, r.continuation)) if a != b), min(len(new), n))
            total += n
    except Exception as e:
        return {"generated": False, "matches_reference": False, "error": one_line(e)}
    return {"generated": True, "matches_reference": matched == len(refs),
            "matching_samples": f"{matched}/{len(refs)}", "matching_prefix_fraction": prefix / total if total else 1.0}


def _stop_ids(model: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def tokenizer_matches(onnx_dir: Path, tokenizer: Any) -> bool:
    """The tokenizer saved beside the graph encodes the sample texts like the source one."""
    try:
        saved = load_tokenizer(str(onnx_dir))
    except EdgeftError:
        return False
    texts = [t for _, t in SAMPLE_TEXTS]
    return all(saved(t)["input_ids"] == tokenizer(t)["input_ids"] for t in texts) and (
        getattr(saved, "chat_template", None) == getattr(tokenizer, "chat_template", None)
    )
