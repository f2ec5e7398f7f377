"""Checks before any weights are loaded for a GenAI folder: the ONNX export's own plan (output path,
model directory, free space) plus whether onnxruntime-genai knows the architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError
from export.onnx import plan_export
from runtime.modelfiles import read_model_config

# HF model_type -> genai_config.json "type" (onnxruntime-genai 0.18 loaded each with an optimum export;
# it treats "gemma3" as the multimodal model, so the text-only Gemma 3 keeps "gemma3_text").
GENAI_TYPES = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
    "gemma3_text": "gemma3_text", "smollm3": "smollm3", "granite": "granite",
}


def genai_type(model_dir: Path) -> str:
    """The GenAI model type of ``model_dir``; an architecture GenAI cannot run is a one-line error."""
    model_type = str(read_model_config(str(model_dir)).get("model_type", ""))
    if model_type not in GENAI_TYPES:
        raise EdgeftError(f"--model {model_dir}: model_type {model_type!r} has no ONNX Runtime GenAI decoder type; "
                          f"supported: {', '.join(sorted(GENAI_TYPES))}")
    return GENAI_TYPES[model_type]


def plan_genai(model_dir: Path, output: Path, variant: str, overwrite: bool) -> tuple[Any, str]:
    """Every check that needs no weights; returns (tokenizer, GenAI model type)."""
    tokenizer = plan_export(model_dir, output, variant, overwrite)
    return tokenizer, genai_type(model_dir)
