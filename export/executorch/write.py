"""Write an ExecuTorch program: the merged model behind a static KV cache (``StaticCacheLM``), optionally
quantized with torchao (int8 dynamic activations per token with int8 weights per output channel, 8da8w,
or int4 weights in groups of 32, 8da4w: the schemes XNNPACK's qd8-f32-qc8w / qd8-f32-qb4w kernels run),
``torch.export`` with a dynamic sequence length, lowered to XNNPACK, saved as ``model.pte`` with
``edgeft-executorch.json`` and the tokenizer beside it.

Why a wrapper of our own: transformers 4.57's ``TorchExportableModuleForDecoderOnlyLM`` registers the
cache tensors as buffers *and* reaches them through the cache object, so torch 2.13's export sees each
one twice (deduplicated inputs) and ``run_decompositions`` fails ("expected compiled_fn to be
GraphModule"). Here the cache layers are pointed at the module's buffers inside ``forward``, so each
tensor enters the graph once, as a mutated buffer.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError, one_line
from edgeft.core.fsutil import write_json
from runtime.backends.executorch_backend import PROGRAM_META
from runtime.mobile import PTE_MODEL

GROUP_SIZE = 32  # 8da4w weights per scale along the input dimension
# quantization -> (torchao weight dtype name, weights per scale: None = one scale per output channel).
# Both use torchao's Int8DynamicActivationIntxWeightConfig, which executorch's own LLM export uses for
# these modes; every quantized linear lowers into the XNNPACK delegate (checked on the tiny test model).
WEIGHT_SCHEMES: dict[str, tuple[str, int | None]] = {"8da8w": ("int8", None), "8da4w": ("int4", GROUP_SIZE)}
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "vocab.json",
              "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def static_cache_lm(model: Any, max_seq_len: int) -> Any:
    """``model`` behind a batch-1 static cache of ``max_seq_len``: forward(input_ids (1,T), cache_position (T,)) → logits."""
    import torch
    from transformers import StaticCache

    class StaticCacheLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            config = model.config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            self.cache = StaticCache(max_cache_len=max_seq_len, config=config)
            self.cache.early_initialization(1, config.num_key_value_heads, head_dim, torch.float32, "cpu")
            for i, layer in enumerate(self.cache.layers):
                self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
                self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)

        def forward(self, input_ids: Any, cache_position: Any) -> Any:
            for i, layer in enumerate(self.cache.layers):  # (1, kv_heads, max_seq_len, head_dim) each
                layer.keys, layer.values = getattr(self, f"key_cache_{i}"), getattr(self, f"value_cache_{i}")
            out = self.model(input_ids=input_ids, cache_position=cache_position, past_key_values=self.cache,
                             use_cache=True, attention_mask=None)
            return out.logits  # (1, T, V)

    return StaticCacheLM().eval()


def quantize_linears(model: Any, quantize: str) -> dict[str, Any]:
    """torchao ``quantize`` (8da8w or 8da4w) on every linear layer, the output projection included;
    returns the settings."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    dtype, group = WEIGHT_SCHEMES[quantize]
    quantize_(model, Int8DynamicActivationIntxWeightConfig(
        weight_dtype=getattr(torch, dtype), weight_granularity=PerAxis(0) if group is None else PerGroup(group)))
    scales = "one scale per output channel" if group is None else f"one scale per {group} weights"
    return {"scheme": quantize, "activations": "int8 dynamic per token", "weights": f"{dtype} symmetric, {scales}",
            "group_size": group, "library": "torchao"}


def lower_to_pte(model: Any, max_seq_len: int, path: Path) -> None:
    """torch.export (dynamic sequence length 1 .. max_seq_len - 1) → XNNPACK → ``path``."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    lm = static_cache_lm(model, max_seq_len)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len - 1)
    example = (torch.zeros((1, 4), dtype=torch.long), torch.arange(4))
    try:
        with torch.no_grad():
            exported = torch.export.export(lm, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)
            program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                                  compile_config=EdgeCompileConfig(_check_ir_validity=False))
            buffer = program.to_executorch().buffer
    except Exception as e:  # torch.export / exir raise many types for graphs they cannot take
        raise EdgeftError(f"ExecuTorch export failed: {one_line(e)}") from None
    path.write_bytes(buffer)


def write_program(model: Any, model_dir: Path, dest: Path, *, quantize: str, max_seq_len: int) -> dict[str, Any]:
    """``dest/model.pte`` (quantized as asked), its metadata and the tokenizer/config files; returns the settings."""
    settings: dict[str, Any] = quantize_linears(model, quantize) if quantize in WEIGHT_SCHEMES else {"scheme": "fp32"}
    lower_to_pte(model, max_seq_len, dest / PTE_MODEL)
    for name in SIDE_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, dest / name)
    write_json(dest / PROGRAM_META, {"max_seq_len": max_seq_len, "vocab_size": int(model.config.vocab_size),
                                     "quantization": quantize, "method": "forward",
                                     "inputs": ["input_ids int64 (1, T)", "cache_position int64 (T,)"],
                                     "outputs": ["logits float32 (1, T, V)"], "backend": "XNNPACK"})
    settings["max_seq_len"] = max_seq_len
    return settings
