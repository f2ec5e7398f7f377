"""Per-architecture tensor transforms: how a Hugging Face tensor is reshaped on its way into a GGUF.

A row of ``tables.ARCHITECTURES`` names at most one transform. The writer calls it for every
tensor with the tensor's GGUF kind (``gguf.MODEL_TENSOR``), the tensor as safetensors holds it
(torch, HF layout) and ``config.json``; it returns the tensor in llama.cpp's layout, and tensors
it does not concern unchanged. An architecture that needs one gets a function here, written
after the ``modify_tensors`` of its model class in llama.cpp's ``convert_hf_to_gguf.py``.
"""

from __future__ import annotations

from typing import Any, Callable

import gguf

# (kind, tensor in HF layout, config.json) -> tensor in GGUF layout
TensorTransform = Callable[[gguf.MODEL_TENSOR, Any, dict[str, Any]], Any]


def llama_qk_rope_layout(kind: gguf.MODEL_TENSOR, w: Any, config: dict[str, Any]) -> Any:
    """Llama family: q/k rows (weights and biases) from HF's RoPE layout to llama.cpp's.

    llama.cpp's rotary embedding pairs dimensions (i, i + 1) inside each head, HF pairs
    (i, i + head_dim / 2) (convert_hf_to_gguf.py: LlamaModel.permute). Qwen2-style GGUFs keep
    the HF ("neox") layout and need no transform.
    """
    n_head = int(config["num_attention_heads"])
    if kind == gguf.MODEL_TENSOR.ATTN_Q:
        return permute_for_gguf_rope(w, n_head)
    if kind == gguf.MODEL_TENSOR.ATTN_K:
        return permute_for_gguf_rope(w, int(config.get("num_key_value_heads") or n_head))
    return w


def permute_for_gguf_rope(w: Any, n_head: int) -> Any:
    """Reorder q/k rows from HF's rotate-half RoPE layout to llama.cpp's interleaved one.

    Per head, HF keeps the first and second halves of each rotary pair in two blocks
    ``[x0 .. x(d/2-1) | y0 .. y(d/2-1)]``; llama.cpp expects them interleaved ``[x0 y0 x1 y1 ..]``.
    Works for weights (rows, cols) and biases (rows,).
    """
    rows = w.shape[0]
    head_dim = rows // n_head
    rest = tuple(w.shape[1:])
    # (n_head, 2, head_dim/2, *rest) -> (n_head, head_dim/2, 2, *rest): interleave the halves
    return w.reshape(n_head, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)


# Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w (conversion/gemma.py: Gemma3Model.norm_shift)
_GEMMA_NORMS = {gguf.MODEL_TENSOR.ATTN_NORM, gguf.MODEL_TENSOR.ATTN_POST_NORM, gguf.MODEL_TENSOR.FFN_NORM,
                gguf.MODEL_TENSOR.FFN_PRE_NORM, gguf.MODEL_TENSOR.FFN_POST_NORM, gguf.MODEL_TENSOR.ATTN_Q_NORM,
                gguf.MODEL_TENSOR.ATTN_K_NORM, gguf.MODEL_TENSOR.OUTPUT_NORM}


def gemma_norm_plus_one(kind: gguf.MODEL_TENSOR, w: Any, config: dict[str, Any]) -> Any:
    """Gemma 2/3: norm weights are stored as offsets from 1; llama.cpp wants the factor itself."""
    return w.float() + 1.0 if kind in _GEMMA_NORMS else w
