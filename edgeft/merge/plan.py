"""Plan a merge before any weights are loaded: read the adapter and its training run, resolve
the base, choose the policy, the output dtype and the 4-bit setup to reproduce, and refuse bad
inputs (wrong flags, foreign or unfinished adapters, a base of another family, too little disk).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeft.core.errors import ConfigError, EdgeftError, one_line
from edgeft.core.fsutil import ensure_free_space
from edgeft.models import check_weights_safe, resolve_model
from runtime.modelfiles import read_model_config

POLICIES = ("auto", "base", "nf4-dequant")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
BNB_BLOCKSIZE = 64  # transformers' bitsandbytes integration quantizes with Params4bit's default
RUN_FILE = "edgeft-run.json"
PROVENANCE_FILE = "edgeft-merge.json"
RUN_KEYS = ("method", "base_model", "base_model_ref", "quantization", "status", "total_steps")  # copied into it
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# A foreign adapter asked for nf4-dequant: the usual QLoRA recipe (Dettmers et al. 2023).
ASSUMED_QUANT = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32",
                 "quant_storage": "uint8"}


@dataclass(frozen=True)
class Quantization:
    """How bitsandbytes held the base model while the adapter was trained."""

    quant_type: str  # "nf4" | "fp4"
    double_quant: bool
    compute_dtype: str  # torch dtype name
    load_dtype: str  # dtype the base weights had when they were quantized
    quant_storage: str = "uint8"
    assumed: bool = False  # True: not recorded anywhere, ASSUMED_QUANT was used

    def bnb_config(self) -> Any:
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.quant_type, bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, self.quant_storage),
        )


@dataclass(frozen=True)
class MergePlan:
    """Everything ``merge_adapter`` needs, validated before any weights are loaded."""

    adapter: Path
    output: Path
    base: str
    policy: str  # effective: "base" | "nf4-dequant"
    requested_policy: str
    dtype: str  # "fp32" | "fp16" | "bf16"
    method: str | None
    quant: Quantization | None  # None: the adapter was trained on a 16-bit base
    tokenizer_dir: str
    adapter_shapes: dict[str, tuple[int, ...]]
    params: int | None  # parameter count of a local base (None for a Hub id)
    run: dict[str, Any] | None
    overwrite: bool

    @property
    def other_policy(self) -> str | None:
        """The policy also measured for comparison (only meaningful for 4-bit-trained adapters)."""
        if self.quant is None:
            return None
        return "base" if self.policy == "nf4-dequant" else "nf4-dequant"

    def provenance(self) -> dict[str, Any]:
        return {
            "adapter": str(self.adapter),
            "base": self.base,
            "policy": self.policy,
            "requested_policy": self.requested_policy,
            "dtype": self.dtype,
            "method": self.method,
            "quantization": asdict(self.quant) if self.quant else None,
            # a few fields of edgeft-run.json, not all: it also holds samples of the training data
            "training_run": {k: self.run[k] for k in RUN_KEYS if k in self.run} if self.run is not None else None,
        }


def plan_merge(adapter: Path, output: Path, *, base: str | None, policy: str, dtype: str,
               overwrite: bool) -> MergePlan:
    """Validate the inputs and decide what to do; reads only small files."""
    problems = []
    if policy not in POLICIES:
        problems.append(f"--policy {policy}: expected one of {', '.join(POLICIES)}")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if problems:
        raise ConfigError("; ".join(problems))

    adapter, output = Path(adapter).expanduser().resolve(), Path(output).expanduser().absolute()
    adapter_cfg = _read_adapter_config(adapter)
    shapes = _read_adapter_weights(adapter)
    run = _read_run(adapter)
    if output.exists() and not overwrite:
        raise EdgeftError(f"--output {output} already exists; pass --overwrite to replace it")
    if output.resolve() == adapter or adapter.is_relative_to(output.resolve()):
        raise EdgeftError(f"--output {output} would replace the adapter it is made from; choose another directory")

    quant = _training_quantization(run, adapter, policy)
    effective = policy if policy != "auto" else ("nf4-dequant" if quant is not None else "base")
    if effective == "nf4-dequant" and quant is None:
        quant = Quantization(**_quant_fields(ASSUMED_QUANT, load_dtype="float32"), assumed=True)
    base_dir = _resolve_base(base, run, adapter_cfg, adapter)
    check_weights_safe(base_dir)
    _check_base_family(base_dir, adapter_cfg, adapter)
    tokenizer_dir = str(adapter) if any((adapter / f).is_file() for f in _TOKENIZER_FILES) else base_dir

    params = _param_count(base_dir)
    if params:
        # merged weights + one temp copy of the tokenizer and configs (a few MiB)
        ensure_free_space(output, params * _dtype_bytes(dtype) + 64 * 2**20, "the merged model")
    return MergePlan(
        adapter=adapter, output=output, base=base_dir, policy=effective, requested_policy=policy, dtype=dtype,
        method=(run or {}).get("method") or None, quant=quant, tokenizer_dir=tokenizer_dir,
        adapter_shapes=shapes, params=params, run=run, overwrite=overwrite,
    )


def _read_adapter_config(adapter: Path) -> dict[str, Any]:
    if not adapter.is_dir():
        raise EdgeftError(f"--adapter {adapter}: directory not found")
    path = adapter / ADAPTER_CONFIG
    if not path.is_file():
        raise EdgeftError(f"--adapter {adapter}: not a PEFT adapter ({ADAPTER_CONFIG} missing)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise EdgeftError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise EdgeftError(f"{path}: peft_type {kind!r}; only LoRA adapters (peft_type LORA) can be merged")
    return cfg


def _read_adapter_weights(adapter: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the adapter tensors; the file is read through once so a damaged one fails here."""
    path = adapter / ADAPTER_WEIGHTS
    if not path.is_file():
        other = " (only pickle weights found; edgeft loads safetensors only)" if (adapter / "adapter_model.bin").is_file() else ""
        raise EdgeftError(f"--adapter {adapter}: {ADAPTER_WEIGHTS} missing{other}")
    from safetensors import safe_open

    try:
        shapes = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_tensor(key).shape)
    except Exception as e:  # safetensors raises its own error type, and OSError for short reads
        raise EdgeftError(f"{path}: unreadable or truncated safetensors file ({one_line(e)}); re-run training or re-copy it") from None
    if not any(".lora_A." in k for k in shapes):
        raise EdgeftError(f"{path}: holds no LoRA weights (no lora_A tensors)")
    return shapes


def _read_run(adapter: Path) -> dict[str, Any] | None:
    from runtime.artifacts import read_run

    run = read_run(adapter)
    if not run:
        return None
    if run.get("status") == "running":  # `edgeft train` writes the adapter only when it completes
        raise EdgeftError(f"--adapter {adapter}: training has not completed ({RUN_FILE} status running); "
                          "finish it with `edgeft train ... --resume`")
    return run


def _quant_fields(q: dict[str, Any], *, load_dtype: str) -> dict[str, Any]:
    compute = str(q.get("compute_dtype") or "float32").replace("torch.", "")
    return {
        "quant_type": str(q.get("quant_type") or "nf4"),
        "double_quant": bool(q.get("double_quant", True)),
        "compute_dtype": compute,
        "load_dtype": load_dtype or compute,
        "quant_storage": str(q.get("quant_storage") or "uint8").replace("torch.", ""),
    }


def _training_quantization(run: dict[str, Any] | None, adapter: Path, policy: str) -> Quantization | None:
    """The 4-bit setup the adapter was trained with, from edgeft-run.json (None: 16-bit base)."""
    if run is None:
        return None
    q = run.get("quantization")
    if not q:
        if policy == "nf4-dequant":
            raise EdgeftError(
                f"--policy nf4-dequant: {adapter / RUN_FILE} says the adapter was trained without "
                "quantization, so there is no 4-bit round trip to reproduce; use --policy base"
            )
        return None
    if not isinstance(q, dict) or not q.get("load_in_4bit"):
        raise EdgeftError(f"{adapter / RUN_FILE}: quantization {q!r} is not a 4-bit bitsandbytes setup; only 4-bit is supported")
    # The weights are quantized in the dtype the base was loaded in (fp32 and bf16 round trips
    # differ); edgeft loads the base in the compute dtype unless the run says otherwise.
    load_dtype = str(run.get("torch_dtype") or run.get("dtype") or "").replace("torch.", "")
    fields = _quant_fields(q, load_dtype=load_dtype)
    problems = []
    if int(q.get("blocksize") or BNB_BLOCKSIZE) != BNB_BLOCKSIZE:
        problems.append(f"blocksize {q.get('blocksize')} (transformers quantizes with {BNB_BLOCKSIZE})")
    if fields["quant_type"] not in {"nf4", "fp4"}:
        problems.append(f"quant_type {fields['quant_type']!r} (expected nf4 or fp4)")
    for key in ("compute_dtype", "load_dtype"):
        if fields[key] not in DTYPES.values():
            problems.append(f"{key} {fields[key]!r} (expected one of {', '.join(DTYPES.values())})")
    if problems:
        raise EdgeftError(f"{adapter / RUN_FILE}: quantization: " + "; ".join(problems))
    return Quantization(**fields)


def _resolve_base(base: str | None, run: dict[str, Any] | None, adapter_cfg: dict[str, Any], adapter: Path) -> str:
    if base:
        return resolve_model(base, flag="--base")
    recorded = (run or {}).get("base_model")
    source = f"{adapter / RUN_FILE} base_model"
    if not recorded:
        recorded, source = adapter_cfg.get("base_model_name_or_path"), f"{adapter / ADAPTER_CONFIG} base_model_name_or_path"
    if not recorded:
        raise EdgeftError(f"--adapter {adapter}: no base model recorded with the adapter; pass --base")
    try:
        return resolve_model(recorded, flag="--base")
    except EdgeftError as e:
        raise EdgeftError(f"base model from {source} is not usable ({e.format_message()}); pass --base") from None


def _check_base_family(base: str, adapter_cfg: dict[str, Any], adapter: Path) -> None:
    """Refuse an adapter for another architecture before loading anything (shapes come later)."""
    base_cfg = read_model_config(base)
    recorded = adapter_cfg.get("base_model_name_or_path")
    if not base_cfg or not recorded:
        return
    rec_cfg = read_model_config(recorded) if Path(recorded).is_dir() else {}
    a, b = rec_cfg.get("model_type"), base_cfg.get("model_type")
    if a and b and a != b:
        raise EdgeftError(f"--adapter {adapter} was trained on a {a} model ({recorded}); the base {base} is {b}; pass the right --base")


def _param_count(base: str) -> int | None:
    """Parameter count from the safetensors headers of a local base (no tensor data read)."""
    files = sorted(Path(base).glob("*.safetensors")) if Path(base).is_dir() else []
    if not files:
        return None
    import math

    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2
