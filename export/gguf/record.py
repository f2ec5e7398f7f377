"""The verification record of a GGUF export: the checks, and the figures that describe the file
(size, architecture, tokenizer choices, the type of every tensor, timings, package versions)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from edgeft.core.records import Check, Record
from export.gguf.plan import ExportPlan
from export.gguf.tensor_types import gguf_tensor_types


def gguf_record(plan: ExportPlan, path: Path, checks: list[Check], verify_metrics: dict[str, Any],
                modelfile: Path, timings: dict[str, float]) -> Record:
    """The record of ``plan.output``, whose bytes are (still) at ``path``."""
    size = path.stat().st_size
    return Record(
        artifact=str(plan.output), kind="gguf", reference=str(plan.model_dir), checks=checks,
        metrics={
            "type": plan.qtype,
            "file_size_bytes": size,
            "file_size_mib": round(size / 2**20, 2),
            **_describe(plan, path),
            "modelfile": str(modelfile),
            **verify_metrics,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
        },
    )


def _describe(plan: ExportPlan, path: Path) -> dict[str, Any]:
    """What was written: architecture, tokenizer choices, and the type of every tensor."""
    import gguf

    types = gguf_tensor_types(path)
    v = plan.vocab
    return {
        "architecture": {"hf": plan.hf_arch, "gguf": gguf.MODEL_ARCH_NAMES[plan.arch.gguf_arch],
                         "tied_embeddings": "output.weight" not in types},
        "n_params": plan.n_params,
        "tensor_types": dict(Counter(types.values())),
        "embedding_type": types.get("token_embd.weight"),
        "output_type": types.get("output.weight", "tied to token_embd"),
        "intermediate": None if plan.spec.direct else plan.source_dtype,
        "tokenizer": {"model": v.model, "pre": v.pre, "pre_reason": v.pre_reason, "tokens": len(v.tokens),
                      "add_bos": v.add_bos, "add_eos": v.add_eos,
                      "special_ids": dict(v.special.special_token_ids),
                      "chat_template": v.special.chat_template is not None},
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("llama-cpp-python", "gguf", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
