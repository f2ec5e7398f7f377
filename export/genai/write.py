"""Write ``genai_config.json`` beside an exported decoder: the graph's input/output names and cache shape,
the model's token ids with the chat template's end-of-turn tokens as stop ids, and greedy search defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError
from edgeft.core.fsutil import write_json
from export.onnx.write import ONNX_NAME
from runtime.bench.evalset import stop_ids
from runtime.mobile import GENAI_CONFIG

# The optimum export's interface (export/onnx/__init__.py), in GenAI's %d-per-layer naming.
GRAPH_INPUTS = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
GRAPH_OUTPUTS = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}


def cache_shape(graph: Path) -> tuple[int, int, int]:
    """(layers, kv heads, head size) from the graph's past_key_values inputs (static dims in the export)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    keys = [i for i in model.graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
    if not keys:
        raise EdgeftError(f"{graph}: no past_key_values inputs; a GenAI folder needs the export with KV cache")
    dims = keys[0].type.tensor_type.shape.dim  # (batch, kv_heads, past_len, head_dim)
    return len(keys), int(dims[1].dim_value), int(dims[3].dim_value)


def end_of_turn_ids(tokenizer: Any, model_dir: Path) -> list[int]:
    """Stop ids: EOS and generation_config's, then the chat template's end-of-turn token where it is one token."""
    from export.gguf.tables import find_chat_format

    ids = stop_ids(tokenizer, model_dir)
    fmt = find_chat_format(getattr(tokenizer, "chat_template", None))
    for text in fmt.stops[:1] if fmt else ():
        token = tokenizer.convert_tokens_to_ids(text)
        if isinstance(token, int) and token != tokenizer.unk_token_id and token not in ids:
            ids.append(token)
    return ids


def genai_config(config: dict[str, Any], *, model_type: str, layers: int, kv_heads: int, head_size: int,
                 eos: list[int], pad: int | None, bos: int | None) -> dict[str, Any]:
    """The ``genai_config.json`` content (pure); greedy search by default, as edgeft verifies it."""
    context = int(config.get("max_position_embeddings") or 2048)
    return {
        "model": {
            "bos_token_id": bos, "context_length": context, "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos[0], "type": model_type,
            "vocab_size": int(config["vocab_size"]),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": ONNX_NAME, "head_size": head_size, "hidden_size": int(config["hidden_size"]),
                "inputs": GRAPH_INPUTS, "outputs": GRAPH_OUTPUTS,
                "num_attention_heads": int(config["num_attention_heads"]), "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
        },
        "search": {"do_sample": False, "early_stopping": True, "max_length": context, "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_config(directory: Path, model_dir: Path, tokenizer: Any, model_type: str) -> dict[str, Any]:
    """Write ``directory/genai_config.json`` for the graph there; returns its content."""
    config = json.loads((directory / "config.json").read_text())
    layers, kv_heads, head_size = cache_shape(directory / ONNX_NAME)
    eos = end_of_turn_ids(tokenizer, model_dir)
    if not eos:
        raise EdgeftError(f"--model {model_dir}: no end-of-sequence token (tokenizer and generation_config name none)")
    content = genai_config(config, model_type=model_type, layers=layers, kv_heads=kv_heads, head_size=head_size,
                           eos=eos, pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id)
    write_json(directory / GENAI_CONFIG, content)
    return content
