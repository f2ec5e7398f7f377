"""Write a planned model into one GGUF file (f32, f16 or bf16) with gguf-py's GGUFWriter.

The writer is a state machine that refuses out-of-order calls: metadata first, then the
tensor table, header, key-value and tensor-info blocks, then the tensor data, streamed from
safetensors one tensor at a time (each passed through its architecture's transform).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.core.errors import EdgeftError, one_line
from edgeft.core.progress import step_progress
from export.gguf import arch_hooks as H
from export.gguf.plan import ExportPlan, TensorPlan
from export.gguf.tables import PRECISIONS
from export.gguf.tensor_types import choose_tensor_type
from export.gguf.vocab import add_vocab_metadata


def write_gguf(plan: ExportPlan, path: Path, precision: str) -> None:
    """Write the whole model to ``path`` with 2-D tensors in ``precision`` (f32, f16 or bf16).

    Tensors stream from safetensors one at a time: peak memory is one tensor, not the model.
    """
    import gguf

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[plan.arch.gguf_arch])
    try:
        _add_model_metadata(writer, plan, PRECISIONS[precision].file_type)
        add_vocab_metadata(writer, plan.vocab)
        out_types = _add_tensor_infos(writer, plan, precision)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensor_data(writer, plan, out_types)
    finally:
        writer.close()


def _add_tensor_infos(writer: Any, plan: ExportPlan, precision: str) -> list[str]:
    """Name, shape and type of every tensor, in writing order; returns each tensor's type."""
    out_types: list[str] = []
    for t in plan.tensors:
        kind = choose_tensor_type(t.shape, precision)
        out_types.append(kind)
        p = PRECISIONS[kind]
        nbytes = int(np.prod(t.shape)) * p.nbytes
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(p.numpy_dtype), nbytes, raw_dtype=p.ggml_type)
    for name, arr in plan.extra_tensors:
        writer.add_tensor_info(name, arr.shape, np.dtype(np.float32), arr.size * 4, raw_dtype=PRECISIONS["f32"].ggml_type)
    return out_types


def _write_tensor_data(writer: Any, plan: ExportPlan, out_types: list[str]) -> None:
    """Each tensor read, checked finite, transformed and converted, in the order of the tensor table."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack, step_progress("writing GGUF tensors") as bar:
        handles: dict[Path, Any] = {}
        task = bar.add_task("writing GGUF tensors", total=len(plan.tensors))
        for t, kind in zip(plan.tensors, out_types):
            if t.file not in handles:
                handles[t.file] = stack.enter_context(safe_open(str(t.file), framework="pt"))
            x = _read_finite(handles[t.file], t)
            if plan.arch.transform is not None:
                x = plan.arch.transform(t.kind, x, plan.config)
            writer.write_tensor_data(_to_numpy(x, kind))
            bar.advance(task)
        for _, arr in plan.extra_tensors:
            writer.write_tensor_data(arr.astype(np.float32))


def _read_finite(handle: Any, t: TensorPlan) -> Any:
    """Tensor ``t`` from an open safetensors file; an unreadable or non-finite one is an EdgeftError."""
    import torch

    try:
        x = handle.get_tensor(t.hf_name)
    except Exception as e:
        raise EdgeftError(f"{t.file}: cannot read tensor {t.hf_name} ({one_line(e)})") from None
    if not bool(torch.isfinite(x).all()):
        raise EdgeftError(f"{t.file}: tensor {t.hf_name} holds NaN or inf values; the model is corrupt")
    return x


def _to_numpy(x: Any, kind: str) -> np.ndarray:
    import torch

    if kind == "f32":
        return x.to(torch.float32).contiguous().numpy()
    if kind == "f16":
        return x.to(torch.float16).contiguous().numpy()
    # bf16: numpy has no bfloat16; the raw 16-bit patterns go out as uint16
    return x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def _add_model_metadata(w: Any, plan: ExportPlan, file_type: Any) -> None:
    """The ``general.*`` and ``{arch}.*`` keys: sizes, heads, RoPE, norms, file type."""
    import gguf

    c = plan.config
    n_embd = int(c["hidden_size"])
    n_head = int(c["num_attention_heads"])
    head_dim = H.head_dim(c)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(_model_name(plan))
    w.add_context_length(int(c.get("max_position_embeddings") or 2048))
    w.add_embedding_length(n_embd)
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(c.get("num_key_value_heads") or n_head))
    w.add_rope_dimension_count(H.rope_dims(c))
    w.add_key_length(head_dim)  # always: readers differ in what they assume without it
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(c.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(len(plan.vocab.tokens))
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_rope_scaling(w, c)
    if plan.arch.metadata is not None:
        plan.arch.metadata(w, c)


def _model_name(plan: ExportPlan) -> str:
    name = str(plan.config.get("_name_or_path") or plan.model_dir.name).rsplit("/", 1)[-1] or plan.model_dir.name
    marker = plan.arch.name_marker
    if marker and marker not in name.lower().replace("-", ""):
        name = f"{name} ({marker})"
    return name


def _add_rope_scaling(w: Any, c: dict[str, Any]) -> None:
    """linear/yarn RoPE scaling as metadata keys (llama3 and longrope scaling are tensors: ``arch_hooks``)."""
    import gguf

    rope = c.get("rope_scaling") or {}
    rope_type = H.rope_type(c)
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                            or c.get("max_position_embeddings")))
