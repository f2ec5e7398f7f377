"""PyTorch back-end: a transformers causal LM, merged or unmerged (base as trained + LoRA), eager fp32 compute,
with named task adapters (peft) selected per decoding state.

torch, transformers and peft are imported only inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeft.core.errors import EdgeftError, one_line
from runtime.artifacts import UNMERGED, adapter_config, base_model_of, read_run
from runtime.backends.base import Backend
from runtime.weights import WeightBytes


class TorchBackend(Backend):
    """A transformers causal LM; an adapter directory runs unmerged (base as trained + LoRA).

    A merged directory is loaded in fp32 whatever dtype it was saved in (CPU kernels for fp16
    are slow or missing), so its figures are those of PyTorch eager fp32.

    Task adapters (``load_adapter``) wrap the loaded model in peft once, under their names; each
    decoding state (``clone``) selects one with ``use_adapter`` and passes it to every forward call
    as peft's ``adapter_names`` (``"__base__"``: the model without adapters). peft applies that
    selection through hooks on the shared layers for the call's duration, so the calls of
    concurrent states take turns (``lock``, shared by the clones).
    """

    def __init__(self, path: Path, *, kind: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.kind, self.path = kind, path
        self.model = (self._load_unmerged(path) if kind == UNMERGED else self._load(str(path))).eval()
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.cache: Any = None
        self.adapter_names: tuple[str, ...] = ()  # task adapters loaded by load_adapter
        self.selected: str | None = None
        self.lock = threading.Lock()

    @staticmethod
    def _load(model_dir: str, **kwargs: Any) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        kwargs.setdefault("dtype", torch.float32)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False,
                                                         local_files_only=True, **kwargs)
        except Exception as e:  # transformers raises many types for unloadable directories
            raise EdgeftError(f"{model_dir}: cannot load with transformers ({one_line(e)})") from None
        own_weights(model)
        return model

    def _load_unmerged(self, adapter: Path) -> Any:
        """Base model as the adapter was trained on it (4-bit when edgeft-run.json says so) + LoRA."""
        from peft import PeftModel

        adapter_config(adapter)  # LoRA only: prompt-learning adapters do not decode through a plain cache
        run = read_run(adapter)
        base = base_model_of(adapter, run)
        quant = run.get("quantization")
        if isinstance(quant, dict) and quant.get("load_in_4bit"):
            model = self._load_4bit_base(base, quant)
        else:
            model = self._load(base)
        try:
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        except Exception as e:  # peft raises RuntimeError (shapes), ValueError (targets), KeyError
            raise EdgeftError(f"{adapter}: the adapter does not fit base {base} ({one_line(e)})") from None

    def _load_4bit_base(self, base: str, quant: dict[str, Any]) -> Any:
        """The base in 4 bits as training stored it (``quant`` is edgeft-run.json's quantization), computed in fp32.

        Training may have multiplied in bf16; the reference every artifact is judged against computes
        in fp32 all the same, so a lossless export of the merged model (which holds the same 4-bit
        weights dequantized) agrees with it to float rounding instead of to bf16 rounding.
        """
        import torch
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=str(quant.get("quant_type") or "nf4"),
            bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
            bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8,
        )
        model = self._load(base, dtype=torch.float32, quantization_config=config, device_map={"": "cpu"})
        # As training did: the 16-bit weights outside the 4-bit layers are held in fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for m in model.modules():
            # bitsandbytes' CPU inference kernel casts activations to bf16: keep the fp32 numerics.
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        return model

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA directory onto the loaded weights under ``name`` (before any ``clone``)."""
        from peft import PeftModel

        if self.kind == UNMERGED:
            raise EdgeftError(f"{self.path}: an adapter directory takes no further adapters; serve its base model")
        adapter_config(Path(path))  # LoRA only
        try:
            if self.adapter_names:
                self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name,
                                                       is_trainable=False).eval()
        except Exception as e:  # peft raises RuntimeError (shapes), ValueError (targets), KeyError
            raise EdgeftError(f"--adapter {name}={path}: does not fit {self.path} ({one_line(e)})") from None
        self.adapter_names += (name,)

    def use_adapter(self, name: str | None) -> None:
        """Decode with the named task adapter from now on (None: the model without adapters)."""
        if name is not None and name not in self.adapter_names:
            raise EdgeftError(f"{self.path}: no task adapter {name!r} is loaded")
        self.selected = name

    def _forward(self, ids: Sequence[int], cache: Any) -> np.ndarray:
        torch = self.torch
        extra: dict[str, Any] = {}
        if self.adapter_names:  # peft's per-call selection, one name per batch row
            extra["adapter_names"] = [self.selected or "__base__"]
        with self.lock if self.adapter_names else contextlib.nullcontext(), torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(ids)], dtype=torch.long), past_key_values=cache,
                             use_cache=cache is not None, **extra)
        return out.logits[0].float().numpy()  # (T, V)

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        if self.cache is None:
            self.reset()
        return self._forward(ids, self.cache)[-1]

    def step(self, token: int) -> np.ndarray:
        return self._forward([token], self.cache)[-1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self._forward(ids, None)

    def weight_bytes(self) -> WeightBytes:
        """Bytes of parameters and buffers-held 4-bit weights (tied tensors counted once)."""
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
        emb, out = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        tied = emb is not None and out is not None and emb.weight.data_ptr() == out.weight.data_ptr()
        gathered = 0 if tied or emb is None else emb.weight.numel() * emb.weight.element_size()
        return WeightBytes(total, total - gathered, "torch parameters")


def own_weights(model: Any) -> None:
    """Copy the parameters and buffers out of the memory-mapped checkpoint (safetensors tensors of
    the file's dtype are views of the file): a model that lives on (a server, an exporter whose
    library keeps traced tensors) then neither keeps the file mapped nor faults when it is replaced."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
