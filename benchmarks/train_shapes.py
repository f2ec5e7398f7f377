"""Models and data for benchmarks/bench_train.py: the synthetic Llama shapes (random weights, the
embedded tokenizer's vocabulary) written once per benchmark run, and the packed sequences both sides
train on in GPU mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Llama-2-7B's published shape; rope theta, RMSNorm epsilon and context are the model's own.
LLAMA2_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "intermediate_size": 11008, "max_position_embeddings": 4096}
# The same architecture, small enough that the whole GPU-mode code path runs on a CPU in seconds.
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "intermediate_size": 172, "max_position_embeddings": 4096}
COMMON = {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
          "initializer_range": 0.02}
SHAPES = {"llama2-7b": LLAMA2_7B, "tiny": TINY}
LABELS = {"smollm2": "SmolLM2-135M-Instruct", "llama2-7b": "Llama-2-7B-shaped model (random weights)",
          "tiny": "tiny Llama (random weights)"}


def build_model(shape: str, out: Path, device: str) -> dict[str, Any]:
    """Write a random-weight bf16 Llama of ``shape`` (safetensors) and the embedded model's
    tokenizer to ``out``; returns what the benchmark records about it.

    The model is created on the meta device (no memory, no initialisation), then materialised on
    ``device`` and filled once: N(0, 0.02) weights, RMSNorm scales 1. A 7B model is ~13 GB in bf16.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.models import resolve_model
    from runtime.modelfiles import load_tokenizer

    tok = load_tokenizer(resolve_model(None))
    config = shape_config(shape, tok)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range, generator=gen)
    # rotary inv_freq is a non-persistent buffer left empty by to_empty: it is not saved, and
    # from_pretrained recomputes it.
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    return {"shape": shape, "parameters": n_params, "weights": "random: N(0, 0.02), RMSNorm scales 1; bf16 safetensors",
            "vocabulary": f"the embedded tokenizer's (edgeft.models.resolve_model(None)): {len(tok)} tokens",
            "config": {**SHAPES[shape], **COMMON, "vocab_size": len(tok)}}


def shape_config(shape: str, tok: Any) -> Any:
    """The ``LlamaConfig`` of ``shape`` with ``tok``'s vocabulary and special tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **COMMON, **SHAPES[shape])


def packed_sequences(examples: list[Any], seq_len: int) -> list[dict[str, list[int]]]:
    """The sequences edgeft's ``--packing`` trains on (``edgeft.data.pack``: whole rows, first fit,
    at most ``seq_len`` tokens), each flattened into one block for a plain Trainer. The labels are
    the rows' own (response tokens); a row's first token is never a target, as in edgeft's collate."""
    from edgeft.data import IGNORE_INDEX, pack

    out = []
    for unit in pack(examples, seq_len):
        ids: list[int] = []
        labels: list[int] = []
        for ex in unit:
            ids += ex.input_ids
            labels += [IGNORE_INDEX] + ex.labels[1:]
        out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return out


def data_seen(rows: int, seq_len: int, packed: bool) -> str | dict[str, str]:
    """What each side trains on, for the JSON."""
    rows_text = f"SST-2 train, first {rows} rows"
    if not packed:
        return rows_text
    return {
        "edgeft": f"{rows_text}, chat template, TrainConfig(packing=True): whole rows packed first fit into "
                  f"sequences of at most {seq_len} tokens (edgeft.data.pack); position ids restart at every row; "
                  "loss on response tokens",
        "baseline": "the same packed sequences (edgeft.data.pack on the same tokenized rows), each flattened into "
                    "one block of the same length; plain causal attention over the whole block; the same "
                    "response-token labels; DataCollatorForSeq2Seq",
    }
