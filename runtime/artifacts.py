"""What a path is: an adapter, a merged model, an ONNX export or a GGUF file (small files only).

Nothing here loads weights or imports a back-end; ``describe`` reads configs, headers and
verification records so that every problem with the inputs is found before any model runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError
from edgeft.core.records import ONNX_MODEL
from runtime.mobile import EXECUTORCH, GENAI, ORT, describe_mobile, mobile_kind

UNMERGED, MERGED, ONNX, GGUF = "unmerged", "merged", "onnx", "gguf"
KINDS = (UNMERGED, MERGED, ONNX, GGUF, GENAI, ORT, EXECUTORCH)
# Which engine runs each kind (the report's "backend" column).
BACKEND_OF = {UNMERGED: "pytorch", MERGED: "pytorch", ONNX: "onnxruntime", GGUF: "llama.cpp",
              GENAI: "onnxruntime-genai", ORT: "onnxruntime (ORT format)", EXECUTORCH: "executorch"}

RUN_FILE = "edgeft-run.json"  # written by `edgeft train` beside the adapter
ADAPTER_CONFIG = "adapter_config.json"
_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Artifact:
    """A benchmarked model: where it is, how it is run, and its storage precision."""

    path: Path
    kind: str  # one of KINDS
    precision: str  # "fp32", "fp16", "int8", "q4_k_m", "nf4+lora", ... ("unknown" when not recorded)
    size_bytes: int  # model weight files on disk (tokenizer and configs excluded)
    name: str  # label in tables and plots

    @property
    def backend(self) -> str:
        return BACKEND_OF[self.kind]


def detect_kind(path: Path) -> str | None:
    """The kind of ``path`` from the files it holds, or None when it is none of them."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return GGUF
        with open(path, "rb") as fh:
            return GGUF if fh.read(4) == b"GGUF" else None
    if not path.is_dir():
        return None
    mobile = mobile_kind(path)  # a GenAI folder holds model.onnx too: look for the phone formats first
    if mobile:
        return mobile
    if (path / ONNX_MODEL).is_file():
        return ONNX
    if (path / ADAPTER_CONFIG).is_file():
        return UNMERGED
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return MERGED
    return None


def describe(path: str | Path, *, flag: str) -> Artifact:
    """Kind, precision and size of ``path``; a missing path or unknown kind is a one-line error."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EdgeftError(f"{flag} {path}: not found")
    kind = detect_kind(path)
    if kind is None:
        what = "file" if path.is_file() else "directory"
        raise EdgeftError(
            f"{flag} {path}: unknown artifact kind ({what} is none of: a .gguf file, an ONNX export directory "
            f"with {ONNX_MODEL}, an ONNX Runtime GenAI, ORT-format or ExecuTorch directory, a merged model "
            "directory with config.json and *.safetensors, an adapter directory)"
        )
    if kind in (GENAI, ORT, EXECUTORCH):
        size, precision = describe_mobile(path, kind, flag=flag)
        return Artifact(path, kind, precision, size, path.name)
    if kind == GGUF:
        from runtime.weights import check_gguf_complete

        try:
            header = check_gguf_complete(path)
        except EdgeftError as e:
            raise EdgeftError(f"{flag} {e.format_message()}") from None
        return Artifact(path, kind, header.file_type or "unknown", path.stat().st_size, path.name)
    if kind == ONNX:
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.startswith(ONNX_MODEL))
        return Artifact(path, kind, onnx_precision(path), size, path.name)
    if kind == MERGED:
        return Artifact(path, kind, _merged_precision(path), _files_size(path.glob("*.safetensors")), path.name)
    run = read_run(path)
    base = base_model_of(path, run)
    if base.startswith(("/", ".", "~")) and not Path(base).expanduser().is_dir():
        raise EdgeftError(f"{flag} {path}: its base model {base} (recorded with the adapter) does not exist")
    size = _files_size(Path(base).glob("*.safetensors")) if Path(base).is_dir() else 0
    size += _files_size(path.glob("adapter_model.safetensors"))
    return Artifact(path, kind, _unmerged_precision(run), size, path.name)


# ---------------------------------------------------------------------------------------------
# Adapters


def read_run(adapter: Path) -> dict[str, Any]:
    """``edgeft-run.json`` of an adapter directory ({} for adapters made elsewhere)."""
    path = adapter / RUN_FILE
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text())
    except ValueError as e:
        raise EdgeftError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(run, dict):
        raise EdgeftError(f"{path}: expected a JSON object")
    return run


def adapter_config(adapter: Path) -> dict[str, Any]:
    path = adapter / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EdgeftError(f"{path}: unreadable adapter config ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise EdgeftError(f"{path}: peft_type {kind!r}; only LoRA adapters can be run unmerged (merge other kinds)")
    return cfg


def base_model_of(adapter: Path, run: dict[str, Any] | None = None) -> str:
    """The base model the adapter was trained on: edgeft-run.json, else the PEFT config."""
    run = read_run(adapter) if run is None else run
    base = run.get("base_model") or adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise EdgeftError(f"{adapter}: no base model recorded ({RUN_FILE} and {ADAPTER_CONFIG} name none)")
    return str(base)


def _unmerged_precision(run: dict[str, Any]) -> str:
    q = run.get("quantization")
    if isinstance(q, dict) and q.get("load_in_4bit"):
        return f"{q.get('quant_type') or 'nf4'}+lora"
    return "fp32+lora"


# ---------------------------------------------------------------------------------------------
# Precision of the other kinds


def _merged_precision(directory: Path) -> str:
    try:
        cfg = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    return _DTYPE_NAMES.get(dtype, dtype)


def onnx_precision(directory: Path) -> str:
    """The export variant from its verification record, else guessed from the graph's operators."""
    from edgeft.core.records import RECORD_DIR_NAME

    record = directory / RECORD_DIR_NAME
    if record.is_file():
        try:
            variant = json.loads(record.read_text()).get("metrics", {}).get("variant")
            if variant:
                return str(variant)
        except (OSError, ValueError, AttributeError):
            pass
    try:
        import onnx
    except ImportError:
        return "unknown"
    try:
        model = onnx.load(str(directory / ONNX_MODEL), load_external_data=False)
    except Exception:  # onnx raises DecodeError and others for damaged files; the run reports it
        return "unknown"
    ops = {n.op_type for n in model.graph.node}
    if "MatMulNBits" in ops:
        return "int4"
    if ops & {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul"}:
        return "int8"
    if any(i.data_type == 10 for i in model.graph.initializer):  # TensorProto.FLOAT16
        return "fp16"
    return "fp32"


def _files_size(paths: Any) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())
