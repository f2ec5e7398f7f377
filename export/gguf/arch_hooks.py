"""What some architectures need beyond tensor names: checks, metadata keys and extra tensors.

A row of ``tables.ARCHITECTURES`` names the hooks it needs; each is small and written after
llama.cpp's own converter (``convert_hf_to_gguf.py`` and ``conversion/*.py``) and the model's
loader in ``src/models/*.cpp``, from the llama.cpp that llama-cpp-python 0.3.36 vendors.

- ``check(config) -> problems``: settings the llama.cpp graph cannot express, refused before work;
- ``metadata(writer, config)``: the ``{arch}.*`` keys the generic writer does not add;
- ``extra_tensors(model_dir, config) -> [(gguf name, array)]``: tensors llama.cpp computes with
  that a Hugging Face checkpoint does not store (RoPE factor tables).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.core.errors import one_line


def rope_type(config: dict[str, Any]) -> str:
    """``rope_scaling``'s kind ("default" without one); Phi-3 configs say "type", newer ones "rope_type"."""
    rope = config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        return "?"
    return str(rope.get("rope_type", rope.get("type", "default")))


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))


def rope_dims(config: dict[str, Any]) -> int:
    """Rotary dimensions per head (Phi-4-mini rotates 3/4 of each head: ``partial_rotary_factor``)."""
    return int(head_dim(config) * float(config.get("partial_rotary_factor") or 1.0))


# --------------------------------------------------------------------------------------------
# Llama 3.x: llama3 RoPE scaling as a ``rope_freqs`` tensor (convert_hf_to_gguf.py, LlamaModel)


def llama3_rope_freqs(model_dir: Path, config: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Per-pair frequency divisors for llama3 RoPE scaling (llama.cpp's ``rope_freqs`` tensor).

    transformers computes both inverse-frequency vectors; llama.cpp divides each default
    frequency by its factor, so the factor is their ratio.
    """
    if rope_type(config) != "llama3":
        return []
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    base, _ = ROPE_INIT_FUNCTIONS["default"](cfg, "cpu")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    return [("rope_freqs.weight", (base / scaled).float().numpy())]


# --------------------------------------------------------------------------------------------
# Gemma 3 (conversion/gemma.py: Gemma3Model; src/models/gemma3.cpp)

GEMMA3_SLIDING = "sliding_attention"


def gemma3_layer_is_sliding(config: dict[str, Any]) -> list[bool]:
    """Per layer: sliding-window attention (True) or global. transformers writes ``layer_types``;
    older configs give ``sliding_window_pattern`` (every Nth layer global)."""
    n = int(config["num_hidden_layers"])
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        return [t == GEMMA3_SLIDING for t in types]
    pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6)
    return [bool((i + 1) % pattern) for i in range(n)]


def gemma3_check(config: dict[str, Any]) -> list[str]:
    problems = []
    if config.get("attn_logit_softcapping") is not None:
        # Gemma 2 soft-caps attention logits; llama.cpp's Gemma 3 graph has no such step
        problems.append(f"attn_logit_softcapping={config['attn_logit_softcapping']} (llama.cpp's Gemma 3 graph "
                        "does not cap attention logits)")
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and int(scalar) != head_dim(config):
        # llama.cpp scales queries by 1/sqrt(head_dim) (by model size for the 27B), not by this key
        problems.append(f"query_pre_attn_scalar={scalar} differs from head_dim={head_dim(config)} "
                        "(llama.cpp scales queries by 1/sqrt(head_dim))")
    return problems


def gemma3_metadata(w: Any, config: dict[str, Any]) -> None:
    sliding = gemma3_layer_is_sliding(config)
    if any(sliding) and config.get("sliding_window"):
        w.add_sliding_window(int(config["sliding_window"]))
        w.add_sliding_window_pattern(sliding)  # one flag per layer: True = sliding window
        w.add_rope_freq_base_swa(float(config.get("rope_local_base_freq") or 10000.0))
    if config.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


# --------------------------------------------------------------------------------------------
# Phi-3 / Phi-3.5 / Phi-4-mini (conversion/phi.py: Phi3MiniModel; src/models/phi3.cpp)

PHI3_LONGROPE = ("longrope", "su")


def phi3_check(config: dict[str, Any]) -> list[str]:
    if rope_type(config) not in PHI3_LONGROPE:
        return []
    rope = config["rope_scaling"]
    long_f, short_f = rope.get("long_factor"), rope.get("short_factor")
    want = rope_dims(config) // 2
    if not (isinstance(long_f, list) and isinstance(short_f, list) and len(long_f) == len(short_f) == want):
        return [f"rope_scaling long_factor/short_factor must each hold {want} values (rotary dimensions / 2)"]
    return []


def _phi3_original_ctx(config: dict[str, Any]) -> int:
    rope = config.get("rope_scaling") or {}
    return int(rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
               or config.get("max_position_embeddings") or 4096)


def phi3_metadata(w: Any, config: dict[str, Any]) -> None:
    orig = _phi3_original_ctx(config)
    w.add_rope_scaling_orig_ctx_len(orig)
    # llama.cpp tells Phi-4 from the other Phi-3 graphs by a zero sliding window
    w.add_sliding_window(int(config.get("sliding_window") or 0))
    if rope_type(config) in PHI3_LONGROPE:
        scale = int(config.get("max_position_embeddings") or orig) / orig
        attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        w.add_rope_scaling_attn_factors(attn_factor)


def phi3_rope_factors(model_dir: Path, config: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    if rope_type(config) not in PHI3_LONGROPE:
        return []
    rope = config["rope_scaling"]
    return [("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32)),
            ("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))]


# --------------------------------------------------------------------------------------------
# SmolLM3 (conversion/llama.py: SmolLM3Model; src/models/smollm3.cpp)

SMOLLM3_NO_ROPE_STEP = 4  # llama.cpp hard-codes it: layer i skips RoPE when (i + 1) % 4 == 0


def smollm3_check(config: dict[str, Any]) -> list[str]:
    n = int(config["num_hidden_layers"])
    want = [0 if (i + 1) % SMOLLM3_NO_ROPE_STEP == 0 else 1 for i in range(n)]
    got = config.get("no_rope_layers")
    if got is not None and list(got) != want:
        return [f"no_rope_layers={got} (llama.cpp's SmolLM3 graph skips RoPE on every "
                f"{SMOLLM3_NO_ROPE_STEP}th layer only)"]
    return []


def extra_tensor_problem(model_dir: Path, e: Exception) -> str:
    return f"{model_dir / 'config.json'}: cannot compute the RoPE tables ({one_line(e)})"
