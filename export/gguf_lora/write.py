"""Write a LoRA adapter as llama.cpp's GGUF adapter file (the layout of llama.cpp's convert_lora_to_gguf.py).

Metadata: ``general.architecture`` of the base, ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``. Tensors: ``<base tensor name>.lora_a`` (rank × in) and ``.lora_b`` (out ×
rank), f32. Whatever reorders the rows of a base weight on its way into the GGUF (llama's q/k RoPE
permutation) reorders the rows of lora_b the same way, since the delta is B @ A.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeft.core.errors import EdgeftError
from export.gguf_lora.plan import ADAPTER_WEIGHTS, LoraPlan


def write_lora_gguf(plan: LoraPlan, path: Path) -> None:
    """The adapter of ``plan`` into the GGUF file ``path``."""
    import gguf
    from safetensors import safe_open

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[plan.arch.gguf_arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
    writer.add_name(f"{plan.adapter.name} (LoRA r={plan.rank})")
    with safe_open(str(plan.adapter / ADAPTER_WEIGHTS), framework="pt") as handle:
        for pair in plan.pairs:
            a = handle.get_tensor(pair.a_name).float()
            b = handle.get_tensor(pair.b_name).float()
            if plan.arch.transform is not None:
                b = plan.arch.transform(pair.kind, b, plan.config)
            for suffix, x in ((".lora_a", a), (".lora_b", b)):
                data = np.ascontiguousarray(x.numpy(), dtype=np.float32)
                if not np.isfinite(data).all():
                    raise EdgeftError(f"{plan.adapter}: {pair.a_name if suffix == '.lora_a' else pair.b_name} "
                                      "holds NaN or infinite values")
                writer.add_tensor(pair.gguf_name + suffix, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
