"""The Hugging Face config of a GGUF, completed where transformers' GGUF reader leaves settings out.

transformers 4.57 maps a fixed list of GGUF keys per architecture (integrations/ggml.py,
``GGUF_CONFIG_MAPPING``). What it drops changes the model, so a fine-tune would start from a
different network than the one llama.cpp runs:

| GGUF                                   | HF config                          | dropped for        |
|----------------------------------------|------------------------------------|--------------------|
| ``{arch}.attention.key_length``        | ``head_dim``                       | qwen3, llama, phi3 |
| ``{arch}.rope.dimension_count``        | ``partial_rotary_factor``          | phi3 (Phi-4-mini)  |
| ``rope_freqs`` tensor                  | ``rope_scaling`` (llama3)          | llama (Llama 3.x)  |
| ``rope_factors_long/short`` tensors    | ``rope_scaling`` (longrope)        | phi3               |
| ``{arch}.rope.scaling.*``              | ``rope_scaling`` (linear, yarn)    | all                |
| ``gemma3.attention.sliding_window_pattern`` | ``layer_types``               | gemma3             |
| ``gemma3.rope.freq_base_swa``          | ``rope_local_base_freq``           | gemma3             |
| ``gemma3.final_logit_softcapping``     | ``final_logit_softcapping``        | gemma3             |
| (llama.cpp scales queries by 1/sqrt(head_dim)) | ``query_pre_attn_scalar``  | gemma3             |

``complete_config`` applies each row that the file holds; llama3 scaling parameters are found
by matching the stored factor table (only its ratios are in the file).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeft.core.errors import EdgeftError

# Candidate llama3 RoPE scaling parameters: (low_freq_factor, high_freq_factor); factor and the
# original context are searched too (Llama 3.1: 8, 1, 4, 8192; Llama 3.2: 32, 1, 4, 8192).
_LLAMA3_FREQ_FACTORS = ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0))


def gguf_fields(reader: Any, arch: str) -> dict[str, Any]:
    """``{arch}.*`` scalar and small-array keys, without the prefix."""
    out = {}
    for key, fld in reader.fields.items():
        if key.startswith(arch + "."):
            try:
                out[key[len(arch) + 1:]] = fld.contents()
            except Exception:  # a type the reader cannot decode is not one we need
                continue
    return out


def complete_config(config: Any, reader: Any) -> list[str]:
    """Fill in what transformers dropped; returns the settings changed (recorded with the import)."""
    arch = str(reader.fields["general.architecture"].contents())
    keys = gguf_fields(reader, arch)
    tensors = {t.name: t for t in reader.tensors}
    changed: list[str] = []

    def put(name: str, value: Any) -> None:
        if getattr(config, name, None) != value:
            setattr(config, name, value)
            changed.append(name)

    if hasattr(config, "head_dim"):  # llama.cpp's default when the key is absent: n_embd / n_head
        put("head_dim", int(keys.get("attention.key_length") or config.hidden_size // config.num_attention_heads))
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    if "rope.dimension_count" in keys and int(keys["rope.dimension_count"]) < head_dim:
        put("partial_rotary_factor", int(keys["rope.dimension_count"]) / head_dim)
    before = getattr(config, "rope_scaling", None)
    rope = _rope_scaling(config, keys, tensors)  # the llama3 search tries candidates on the config
    config.rope_scaling = before
    if rope is not None:
        put("rope_scaling", rope)
    if arch == "gemma3":
        _gemma3(config, keys, head_dim, put)
    return changed


def _rope_scaling(config: Any, keys: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any] | None:
    if "rope_freqs.weight" in tensors:
        return _llama3_scaling(config, np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64))
    if "rope_factors_long.weight" in tensors:  # Phi-3 reads the original context from its own key
        config.original_max_position_embeddings = int(keys.get("rope.scaling.original_context_length")
                                                      or config.max_position_embeddings)
        return {"type": "longrope", "long_factor": [float(x) for x in tensors["rope_factors_long.weight"].data],
                "short_factor": [float(x) for x in tensors["rope_factors_short.weight"].data]}
    kind = keys.get("rope.scaling.type")
    if kind in ("linear", "yarn") and keys.get("rope.scaling.factor"):
        out = {"rope_type": kind, "factor": float(keys["rope.scaling.factor"])}
        if kind == "yarn":
            out["original_max_position_embeddings"] = int(keys.get("rope.scaling.original_context_length")
                                                          or config.max_position_embeddings)
        return out
    return None


def _llama3_scaling(config: Any, freqs: np.ndarray) -> dict[str, Any]:
    """The llama3 rope_scaling whose factor table is ``freqs`` (llama.cpp's ``rope_freqs``)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factor = float(np.round(freqs.max(), 4))
    base, _ = ROPE_INIT_FUNCTIONS["default"](config, "cpu")
    for low, high in _LLAMA3_FREQ_FACTORS:
        ctx = 16
        while ctx <= max(int(config.max_position_embeddings), 16):
            cand = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": ctx}
            config.rope_scaling = cand
            scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
            if np.allclose((base / scaled).double().numpy(), freqs, rtol=1e-4, atol=1e-5):
                return cand
            ctx *= 2
    config.rope_scaling = None
    raise EdgeftError("the GGUF's rope_freqs table matches no llama3 RoPE scaling (factor "
                      f"{factor}); transformers cannot express it, so the model is not imported")


def _gemma3(config: Any, keys: dict[str, Any], head_dim: int, put: Any) -> None:
    n = int(config.num_hidden_layers)
    pattern = keys.get("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == n:
        put("layer_types", ["sliding_attention" if p else "full_attention" for p in pattern])
    elif pattern is not None or getattr(config, "layer_types", None) is None:
        step = int(pattern or 6)  # llama.cpp's default for Gemma 3
        put("layer_types", ["sliding_attention" if (i + 1) % step else "full_attention" for i in range(n)])
    if "rope.freq_base_swa" in keys:
        put("rope_local_base_freq", float(keys["rope.freq_base_swa"]))
    put("final_logit_softcapping", float(keys["final_logit_softcapping"]) if keys.get("final_logit_softcapping")
        else None)
    put("query_pre_attn_scalar", head_dim)  # llama.cpp's query scale (1/sqrt(head_dim)) for every size below 27B
