"""The model to train: device and compute dtype, the base model (4-bit NF4 or 16/32-bit) and its
PEFT wrapping (LoRA on the target modules, or a prompt-learning method), ready for steps.

The CPU memory policies of ``edgeft.cpumem`` are applied here and looked up on this module at
call time, so ``benchmarks/train_memory.py`` can switch each one off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeft.config import PEFT_PROMPT_METHODS, TrainConfig
from edgeft.core.errors import ConfigError, EdgeftError
from edgeft.cpumem import (LOAD_MMAP_THRESHOLD, STEP_MMAP_THRESHOLD, dequantize_in_compute_dtype,
                           release_file_mappings, set_mmap_threshold)
from edgeft.train.sharding import shards_model
from edgeft.train.targets import resolve_targets

# Model families whose output is plain ``lm_head(final_hidden)``: the loss can skip the
# projection of prompt and pad positions. Others go through the model's own forward.
SELECTIVE_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2"}


def pick_device(cfg: TrainConfig) -> tuple[str, Any]:
    """(device, compute dtype) for this config and machine."""
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch (is a CUDA build of torch installed?)")
    if cfg.compute_dtype != "auto":
        dtype = getattr(torch, cfg.compute_dtype)
    elif device == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if device == "cpu" and dtype == torch.float16:
        raise ConfigError("--compute-dtype float16 is not supported on CPU; use float32 or bfloat16")
    return device, dtype


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 dot-product instructions (AVX512-BF16 or AMX), where bf16 matmuls
    run about twice as fast as fp32 (one AMD EPYC core: 189 vs 88 GFLOP/s for a 512x576x1536
    matmul). Elsewhere bf16 is emulated and slower, so fp32 is the right compute dtype."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def check_bitsandbytes(device: str) -> None:
    """Fail early, before weights load, if bitsandbytes 4-bit cannot run on ``device``."""
    try:
        import bitsandbytes.functional as bnbf
        import torch

        w = torch.randn(64, 64, device=device)
        q, state = bnbf.quantize_4bit(w, quant_type="nf4")
        bnbf.dequantize_4bit(q, state)
    except Exception as e:  # import errors, missing native library, unsupported device
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeftError(
            f"--method qlora: bitsandbytes 4-bit cannot run on {device} here ({msg[:200]}); use --method lora"
        ) from None


def load_for_training(cfg: TrainConfig, model_ref: str, device: str, dtype: Any, tokenizer: Any) -> Any:
    """``load_model`` under the CPU heap policy for loading, then the one for steps; in train mode."""
    if device == "cpu":
        set_mmap_threshold(LOAD_MMAP_THRESHOLD)
    model = load_model(cfg, model_ref, device, dtype, tokenizer)
    if device == "cpu":
        set_mmap_threshold(STEP_MMAP_THRESHOLD)
    model.train()
    return model


def load_model(cfg: TrainConfig, model_ref: str, device: str, dtype: Any, tokenizer: Any) -> Any:
    """The model to train: 4-bit + LoRA, 16-bit + LoRA, full, or a prompt-learning method."""
    model = _load_base(cfg, model_ref, device, dtype)
    model = _prepare_base_for_training(cfg, model)
    return _wrap_peft(cfg, model)


def _load_base(cfg: TrainConfig, model_ref: str, device: str, dtype: Any) -> Any:
    """The pretrained model on ``device``: 4-bit NF4 for qlora, else in its training dtype."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code, "use_safetensors": None}
    if cfg.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
        # On CUDA: this process's GPU (rank-local under torchrun; GPU 0 otherwise).
        kwargs["device_map"] = {"": device if device == "cpu" else torch.cuda.current_device()}
        # Weights are quantized from their fp32 values and the layers bitsandbytes keeps in 16/32
        # bits stay fp32 (as prepare_model_for_kbit_training wants); only matmuls use ``dtype``.
        kwargs["dtype"] = torch.float32
    else:
        kwargs["dtype"] = dtype if device == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(model_ref, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeftError(f"--model {model_ref}: cannot load model: {first[:300]}") from None
    if cfg.method == "qlora":
        release_file_mappings(model)
        dequantize_in_compute_dtype(model, dtype)
    elif not (device == "cuda" and shards_model(cfg)):  # FSDP moves each process's shard to its GPU
        model.to(device)
    model.config.use_cache = False
    return model


def _prepare_base_for_training(cfg: TrainConfig, model: Any) -> Any:
    """A 4-bit model prepared for k-bit training (frozen base, gradient checkpointing as asked);
    otherwise gradient checkpointing switched on where the method backpropagates through the layers."""
    from peft import prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}
    if cfg.method == "qlora":
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    if cfg.gradient_checkpointing and cfg.method not in PEFT_PROMPT_METHODS:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        if cfg.method == "lora":
            model.enable_input_require_grads()
    return model


def _wrap_peft(cfg: TrainConfig, model: Any) -> Any:
    """``model`` with the adapter of ``cfg.method``; full fine-tuning returns it as it is."""
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

    if cfg.method in ("qlora", "lora"):
        peft_cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                              lora_dropout=cfg.lora_dropout, target_modules=resolve_targets(cfg.target_modules, model),
                              bias="none")
    elif cfg.method == "prompt-tuning":
        peft_cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    elif cfg.method == "prefix-tuning":
        peft_cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    elif cfg.method == "p-tuning":
        peft_cfg = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                                       encoder_hidden_size=model.config.hidden_size)
    else:  # full fine-tuning
        return model
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ConfigError(f"--target-modules {cfg.target_modules}: {str(e).splitlines()[0][:300]}") from None


def uses_selective_head(cfg: TrainConfig, model: Any) -> bool:
    """Whether the loss may run the output projection on response positions only."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return cfg.method not in PEFT_PROMPT_METHODS and model_type in SELECTIVE_HEAD_TYPES
