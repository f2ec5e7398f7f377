"""Shared fixtures: tiny models built from a config (no network), with the embedded model's tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    # Tiny models run fastest single-threaded, and a 2-core CI machine is not oversubscribed.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smol_tokenizer_dir() -> Path:
    """The default model's tokenizer (BPE, chat template) saved as a HF directory, cached."""
    from edgeft.core.fsutil import atomic_dir
    from edgeft.models import default_gguf_path, edgeft_home, gguf_tokenizer

    gguf = default_gguf_path()
    out = edgeft_home() / "test-tokenizers" / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (out / "tokenizer.json").is_file():
        with atomic_dir(out, overwrite=True) as tmp:
            gguf_tokenizer(gguf).save_pretrained(tmp)
    return out


def make_tiny_llama(out: Path, tokenizer_dir: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64,
                    tie: bool = True, init_std: float = 0.2, arch: str = "llama") -> Path:
    """Write a tiny randomly initialised llama-family model (with a real tokenizer) to ``out``.

    ``init_std`` is large enough that next-token distributions are peaked, so top-1
    comparisons are not decided by ties between near-uniform logits.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=init_std,
        tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), smol_tokenizer_dir)


# How `edgeft train --method qlora` records the 4-bit base in edgeft-run.json.
QUANT = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32",
         "quant_storage": "uint8", "blocksize": 64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def bnb_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def make_adapter(base: Path, out: Path, *, qlora: bool, seed: int = 0) -> Path:
    """A LoRA adapter (r=4, all linear layers) as `edgeft train` leaves it: PEFT files, tokenizer, run record.

    ``init_lora_weights=False`` leaves B random, so the adapter moves the outputs and a missing
    merge would show.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": bnb_config()} if qlora else {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **extra)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(base / name, out / name)
    run = {"method": "qlora" if qlora else "lora", "base_model": str(base), "quantization": QUANT if qlora else None}
    (out / "edgeft-run.json").write_text(json.dumps(run))
    return out


@pytest.fixture(scope="session")
def tiny_lora_adapter(tmp_path_factory, tiny_llama_dir) -> Path:
    """A 16-bit LoRA adapter on ``tiny_llama_dir``."""
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("lora") / "adapter", qlora=False)


COLORS = ["red", "blue", "green", "black", "white", "pink", "gray", "gold"]


@pytest.fixture(scope="session")
def task_file(tmp_path_factory) -> Path:
    """A learnable instruction task: 'Colour of item k?' -> a fixed colour (48 rows)."""
    p = tmp_path_factory.mktemp("data") / "colors.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"Colour of item {i % 8}?", "output": COLORS[i % 8]}) + "\n"
                         for i in range(48)))
    return p
