"""Export a merged Hugging Face causal LM to ONNX with a KV cache, optionally quantize it, and verify it.

Pipeline (``export_onnx``): check the model directory (config, safetensors, tokenizer) → load the
PyTorch model in fp32 → record the reference (logits and a greedy continuation for a few sample
texts, one of them chat-formatted) → export fp32 through optimum (task ``text-generation-with-past``)
into a temporary directory → derive the requested variant (int8 / int4 / fp16) from that fp32 graph
→ verify the variant against the reference → write ``edgeft-verify.json`` and rename the directory
into place. A failed verification still writes the directory and a record marked ``failed``.

Output directory (one variant per directory; loads with
``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(DIR)``)::

    model.onnx                 the graph (fp32, fp16, int8 or int4 weights)
    model.onnx_data            external weights, only when the graph is over 2 GB
    config.json, generation_config.json
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja (as the source has them)
    edgeft-verify.json         the verification record

Driving ``model.onnx`` with plain ``onnxruntime.InferenceSession`` (no optimum, no torch)::

    inputs
      input_ids                    int64  (batch, seq)
      attention_mask               int64  (batch, past_len + seq)   1 = real token, 0 = padding
      position_ids                 int64  (batch, seq)              cumsum(attention_mask) - 1, last `seq`
                                                                    columns (padding positions: any value, e.g. 1)
      past_key_values.{i}.key      float32 (batch, num_kv_heads, past_len, head_dim)   i = 0 .. layers-1
      past_key_values.{i}.value    float32 (batch, num_kv_heads, past_len, head_dim)
    outputs
      logits                       float32 (batch, seq, vocab)
      present.{i}.key / .value     float32 (batch, num_kv_heads, past_len + seq, head_dim)

    The first call (prefill) passes the whole prompt with empty past tensors (``past_len`` = 0);
    each later call passes only the new token(s) and feeds ``present.{i}.*`` back as
    ``past_key_values.{i}.*``. Inputs and outputs are float32 in every variant (the fp16 graph
    casts at its edges). Padding goes on the left. ``num_kv_heads`` and ``head_dim`` are static
    in the graph's input shapes; ``runtime`` can read them from ``session.get_inputs()``.

Variants, settings chosen by measurement on SmolLM2-135M-Instruct (2 shared CPU cores, onnxruntime
1.32). Figures: top-1 agreement / mean KL against PyTorch fp32 on this module's samples (231
positions; a 525-position sweep agrees within 0.01), and decode time per token at 40 tokens of context:
- ``fp32``: optimum's export as is: 1.00 / 1e-11, max |logit diff| 1e-4 (bar 1e-3); 514 MiB, 75 ms.
- ``fp16``: ``onnxruntime.transformers.float16``, float32 inputs/outputs kept. Runs on the CPU
  provider but no faster there: 1.00 / 5e-6; 258 MiB, 75 ms.
- ``int8``: MatMulNBits 8-bit symmetric blocks of 32 (``MatMulNBitsQuantizer``), int8 compute
  (accuracy_level 4), logits projection 8-bit, embedding fp16: 0.957 / 0.005; 200 MiB, 36 ms.
  ``quantize_dynamic`` (``Int8Settings(method="dynamic")``) measured 0.56 / 0.74 (0.82 / 0.10 with
  every down_proj left float): one activation scale per tensor cannot hold SmolLM2's first-token
  activations (~3000 against a median of ~2). Weight-only at accuracy_level 0: 0.96 / 0.002 but
  7-10x slower decode than fp32.
- ``int4``: MatMulNBits 4-bit blocks of 32 from the HQQ quantizer, whose float zero points are split
  into uint4 zero points plus a per-block offset MatMul (``split_float_zero_points``) so the fast
  kernels apply; logits projection 8-bit, embedding fp16: 0.974 / 0.004; 158 MiB, 35 ms.
  Caveat: these weights were dequantized from a Q4_1 GGUF and HQQ recovers that grid. With a
  rank-8 delta of 5% of each weight's norm added (a LoRA merge), int4 measures 0.82 / 0.15 (fails its
  bar; int8 stays at 0.96 / 0.006). Round-to-nearest 4-bit (symmetric or not, blocks 16-64,
  k-quant search) measured 0.66-0.71 / 0.38-0.47 on the default weights; HQQ with its float zero
  points kept is as accurate as the split form but ~6x slower than fp32 on CPU.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import shutil
import struct
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgeft.errors import ConfigError, EdgeftError
from edgeft.fsutil import atomic_dir, dir_size, ensure_free_space
from edgeft.models import load_tokenizer, read_model_config
from edgeft.records import RECORD_DIR_NAME, Check, Record, write_record
from runtime.metrics import compare_logits

TASK = "text-generation-with-past"
ONNX_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx_data"  # optimum's name for external weights; we keep it for every variant
VARIANTS = ("fp32", "fp16", "int8", "int4")
# protobuf cannot serialise a message over 2 GiB; stay well below it before switching to external data.
EXTERNAL_DATA_BYTES = 1_800_000_000
_FP32_WORK_DIR = ".fp32"  # inside the temporary output directory; removed before the rename


@dataclass(frozen=True)
class Bars:
    """What a variant must meet against the PyTorch fp32 reference (all sample positions)."""

    top1: float  # minimum top-1 agreement, whole sequences and cached decode steps alike
    mean_kl: float  # maximum mean KL(PyTorch || ONNX) in nats
    atol: float | None = None  # maximum |logit difference|; only where numerical equality is expected
    greedy_exact: bool = False  # cached greedy continuation must equal PyTorch's, token for token
    # size / fp32 size: catches a quantizer that silently did nothing. Loose on purpose: on a tiny
    # model the embedding (kept fp16) dominates; SmolLM2-135M measures fp16 0.50, int8 0.39, int4 0.32.
    max_size_ratio: float | None = None


# Bars, measured on SmolLM2-135M-Instruct (fp32 weights dequantized from its Q4_1 GGUF), 525
# positions of 14 texts (module docstring).
# - fp32 differs from PyTorch by operator order only: max |logit diff| 2e-4 (logits ~30), 1e-5 on the
#   tiny test models. 1e-3 leaves headroom without hiding a real error: a wrong mask or cache slot
#   moves logits by whole units.
# - Top-1 agreement of quantized variants is bounded by near-ties, not quality: 19 of the 22 positions
#   where 8-bit weights changed the argmax had a top-2 margin under 0.1 logit (10% of all positions have
#   a margin under 0.15). So the top-1 bars sit below the starting bars (int8 0.98) and
#   mean KL carries the weight: int8 measured top-1 0.95-0.96 / KL 0.005, int4 0.96-0.97 / KL 0.004.
#   A broken variant is far away: quantize_dynamic int8 0.56 / 0.74, round-to-nearest int4 0.67 / 0.45.
BARS: dict[str, Bars] = {
    "fp32": Bars(top1=0.99, mean_kl=1e-4, atol=1e-3, greedy_exact=True),
    "fp16": Bars(top1=0.98, mean_kl=1e-3, max_size_ratio=0.6),
    "int8": Bars(top1=0.93, mean_kl=0.02, max_size_ratio=0.85),
    "int4": Bars(top1=0.90, mean_kl=0.05, max_size_ratio=0.85),
}


@dataclass(frozen=True)
class Int8Settings:
    """8-bit variant. Defaults chosen by measurement on SmolLM2-135M (module docstring)."""

    # "weight_only": MatMulNBits 8-bit blocks, activations stay float (int8 dot products at
    # accuracy_level 4). "dynamic": quantize_dynamic (MatMulInteger, activations quantized per tensor
    # per call): top-1 0.56 on SmolLM2-135M, whose first-token activations reach 3000.
    method: str = "weight_only"
    block_size: int = 32  # weight_only: weights per scale along the input dimension
    symmetric: bool = True  # weight_only: no zero point
    accuracy_level: int | None = 4  # weight_only: int8 compute in MLAS; several times faster decode on x86
    lm_head_bits: int | None = 8  # logits projection (untied from the embedding to quantize it), None = float
    embedding: str = "fp16"  # embedding table: "fp16" (exact enough, half size) or "fp32"
    per_channel: bool = True  # dynamic only: one scale per output column
    reduce_range: bool = False  # dynamic only: 7-bit weights, for CPUs without VNNI


@dataclass(frozen=True)
class Int4Settings:
    """4-bit variant. Defaults chosen by measurement on SmolLM2-135M (module docstring)."""

    # "hqq": MatMulNBitsQuantizer's HQQ (data-free, float zero points), whose float zero points are
    # then split into uint4 zero points plus a per-block offset so MLAS's fast kernels run it.
    # "rtn": the DEFAULT round-to-nearest quantizer (integer zero points): top-1 0.67 on SmolLM2-135M.
    algorithm: str = "hqq"
    block_size: int = 32  # weights per scale along the input dimension
    symmetric: bool = False  # rtn only
    accuracy_level: int | None = 4  # int8 compute in MLAS: several times faster decode on x86
    lm_head_bits: int | None = 8  # logits projection at 8 bits: 4 bits there costs the most agreement
    embedding: str = "fp16"  # "fp16", "fp32" or "int4" (GatherBlockQuantized; KL x5 on SmolLM2-135M)


INT8 = Int8Settings()
INT4 = Int4Settings()

# Sample texts: prose, code and facts, plus a chat-formatted prompt built with the tokenizer's template.
# Positions are cheap (one forward pass); greedy steps are not, so the prompts are long-ish.
SAMPLE_TEXTS: tuple[tuple[str, str], ...] = (
    ("prose", "The old lighthouse keeper climbed the narrow stairs every evening, lit the lamp, and watched "
              "the fishing boats return to the harbour before the storm. One night he noticed that"),
    ("code", "def fibonacci(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n"
             "        return n\n    a, b = 0, 1\n    for _ in range(n - 1):\n        a, b ="),
    ("facts", "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees. The largest planet "
              "in the solar system is Jupiter, and the capital of France is"),
)
CHAT_SAMPLE = [{"role": "user", "content": "Give me three short tips for saving energy at home."}]
GREEDY_TOKENS = 16  # continuation length for the KV-cache check


# ---------------------------------------------------------------------------------------------
# Entry point


def export_onnx(model_dir: Path, output: Path, *, quantize: str | None = None, overwrite: bool = False) -> Record:
    """Export ``model_dir`` to ONNX in ``output`` (one variant), verify it, and return its record.

    ``quantize``: None (fp32), "int8", "int4" or "fp16". The record is also written to
    ``output/edgeft-verify.json``; a failed verification is returned (status "failed"), not raised.
    """
    variant = _variant(quantize)
    model_dir, output = Path(model_dir), Path(output)
    _check_output(output, overwrite)
    source = inspect_model_dir(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    ensure_free_space(output, _space_needed(source, variant), "the ONNX export")

    progress = _Progress()
    with _quiet():
        with progress.stage("load", f"loading {model_dir.name} (PyTorch, fp32)"):
            model = _load_torch(model_dir)
        with progress.stage("reference", "PyTorch reference: logits and greedy continuation"):
            refs = _torch_reference(model, sample_prompts(tokenizer), GREEDY_TOKENS)
        with atomic_dir(output, overwrite=overwrite) as tmp:
            fp32_bytes, settings = _build(model, model_dir, tmp, variant, progress)
            del model  # the reference is all verification needs; free the weights before ORT loads
            gc.collect()
            with progress.stage("verify", f"verifying {variant} against PyTorch"):
                checks, figures = verify(tmp, refs, variant, tokenizer=tokenizer)
            size = onnx_size(tmp)
            checks += _size_checks(variant, size, fp32_bytes)
            progress.timings["total_s"] = round(time.perf_counter() - progress.start, 2)
            record = Record(artifact=str(output), kind="onnx", reference=str(model_dir), checks=checks, metrics={
                "variant": variant,
                "size_bytes": size,
                "fp32_size_bytes": fp32_bytes,
                "dir_bytes": dir_size(tmp),
                "files": sorted({p.name for p in tmp.iterdir()} | {RECORD_DIR_NAME}),
                "quantizer": settings,
                "timings": progress.timings,
                **figures,
                "bars": asdict(BARS[variant]),
                "versions": _versions(),
            })
            write_record(tmp, record)
    progress.done(record)
    return record


def _build(model: Any, model_dir: Path, tmp: Path, variant: str, progress: _Progress) -> tuple[int, dict[str, Any]]:
    """Export fp32 (into ``tmp``, or a work folder inside it) and derive ``variant``; (fp32 bytes, settings)."""
    fp32_dir = tmp if variant == "fp32" else tmp / _FP32_WORK_DIR
    with progress.stage("export", "exporting fp32 ONNX with KV cache (optimum)"):
        _export_fp32(model, model_dir, fp32_dir)
    fp32_bytes = onnx_size(fp32_dir)
    if variant == "fp32":
        return fp32_bytes, {}
    with progress.stage("convert", f"converting to {variant}"):
        settings = _make_variant(fp32_dir, tmp, variant)
    shutil.rmtree(fp32_dir)  # only the variant ships
    return fp32_bytes, settings


# ---------------------------------------------------------------------------------------------
# Checks before any weights are loaded


def _variant(quantize: str | None) -> str:
    variant = "fp32" if quantize in (None, "", "none", "fp32") else str(quantize).lower()
    if variant not in VARIANTS:
        raise ConfigError(f"--quantize {quantize}: unknown variant; choose one of none, int8, int4, fp16")
    return variant


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise EdgeftError(f"--output {output} exists and is a file; ONNX exports are directories")
    if output.exists() and not overwrite:
        raise EdgeftError(f"--output {output} already exists; pass --overwrite to replace it")


@dataclass
class Source:
    """What the model directory holds, read without loading weights."""

    path: Path
    model_type: str
    weight_files: list[Path]
    n_params: int
    weight_bytes: int


def inspect_model_dir(model_dir: Path) -> Source:
    """Check a merged model directory (config, safetensors, tokenizer); every problem in one error."""
    flag = "--model"
    if not model_dir.is_dir():
        raise EdgeftError(f"{flag} {model_dir}: not a directory")
    problems: list[str] = []
    config: dict[str, Any] = {}
    if not (model_dir / "config.json").is_file():
        problems.append("no config.json")
    else:
        try:
            config = read_model_config(str(model_dir))
        except EdgeftError as e:
            problems.append(str(e.format_message()))
    weight_files = sorted(model_dir.glob("*.safetensors"))
    if not weight_files:
        pickles = [p.name for p in model_dir.glob("*.bin")]
        problems.append("no *.safetensors weights" + (f" (found pickle {pickles[0]}; re-save with safetensors)" if pickles else ""))
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        problems.append("no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    n_params = weight_bytes = 0
    for f in weight_files:
        try:
            n, b = safetensors_size(f)
        except EdgeftError as e:
            problems.append(e.format_message())
            continue
        n_params, weight_bytes = n_params + n, weight_bytes + b
    problems += _missing_shards(model_dir)
    if problems:
        raise EdgeftError(f"{flag} {model_dir}: " + "; ".join(problems))
    model_type = str(config.get("model_type", ""))
    _check_supported(model_dir, model_type)
    return Source(model_dir, model_type, weight_files, n_params, weight_bytes)


def safetensors_size(path: Path) -> tuple[int, int]:
    """(parameter count, data bytes) from a safetensors header; truncated or corrupt files raise."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise EdgeftError(f"{path.name} is truncated ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise EdgeftError(f"{path.name} is corrupt or truncated (header length {n} > file size {size})")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise EdgeftError(f"{path.name} is corrupt (header is not JSON)") from None
    if not isinstance(header, dict):
        raise EdgeftError(f"{path.name} is corrupt (header is not a JSON object)")
    params, end = 0, 0
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            params += math.prod(info["shape"])
            end = max(end, int(info["data_offsets"][1]))
    except (KeyError, TypeError, IndexError, ValueError):
        raise EdgeftError(f"{path.name} is corrupt (bad tensor entry in header)") from None
    if 8 + n + end > size:
        raise EdgeftError(f"{path.name} is truncated ({size} bytes; its header declares {8 + n + end}); copy or save it again")
    return params, end


def _missing_shards(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        return [f"{index.name} is not a valid shard index"]
    return [f"shard {s} listed in {index.name} is missing" for s in sorted(shards) if not (model_dir / s).is_file()]


def _check_supported(model_dir: Path, model_type: str) -> None:
    with _quiet():
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
        from optimum.exporters.tasks import TasksManager

        try:
            tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
        except (KeyError, ValueError):
            tasks = {}
    if TASK not in tasks:
        raise EdgeftError(f"--model {model_dir}: optimum cannot export model_type {model_type!r} to ONNX with a KV cache")


def _space_needed(source: Source, variant: str) -> int:
    fp32 = source.n_params * 4
    share = {"fp32": 0.0, "fp16": 0.5, "int8": 0.35, "int4": 0.3}[variant]  # variant size / fp32 size, generous
    # fp32 graph + variant graph + intermediate files of the quantizers + tokenizer/config slack.
    return int(fp32 * (1 + 2 * share) + 64 * 2**20)


# ---------------------------------------------------------------------------------------------
# PyTorch side: load and reference


def _load_torch(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, use_safetensors=True, local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # transformers raises many types for unreadable checkpoints
        raise EdgeftError(f"--model {model_dir}: cannot load the model: {_one_line(e)}") from None
    return model.eval()


@dataclass
class Sample:
    name: str
    prompt: list[int]


def sample_prompts(tokenizer: Any) -> list[Sample]:
    """Token ids of the sample texts and, where the tokenizer has a chat template, a chat prompt."""
    samples = [Sample(name, tokenizer(text)["input_ids"]) for name, text in SAMPLE_TEXTS]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(CHAT_SAMPLE, tokenize=False, add_generation_prompt=True)
        samples.append(Sample("chat", tokenizer(text, add_special_tokens=False)["input_ids"]))
    return [s for s in samples if s.prompt]


@dataclass
class Reference:
    """PyTorch's view of one sample: greedy continuation and logits over prompt + continuation."""

    name: str
    prompt: list[int]
    continuation: list[int]
    logits: np.ndarray  # (len(prompt) + len(continuation), V) float32

    @property
    def step_logits(self) -> np.ndarray:
        """Logits that predict each continuation token: (len(continuation), V)."""
        p = len(self.prompt)
        return self.logits[p - 1 : p - 1 + len(self.continuation)]


def _torch_reference(model: Any, samples: Sequence[Sample], n_new: int) -> list[Reference]:
    import torch

    refs = []
    with torch.inference_mode():
        for s in samples:
            ids, past, cont = torch.tensor([s.prompt]), None, []
            for _ in range(n_new):  # greedy with PyTorch's own cache, the reference continuation
                out = model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                cont.append(int(out.logits[0, -1].argmax()))
                ids = torch.tensor([[cont[-1]]])
            logits = model(input_ids=torch.tensor([s.prompt + cont]), use_cache=False).logits[0]
            logits = logits.float().numpy()  # (T, V)
            if not np.isfinite(logits).all():
                raise EdgeftError("the PyTorch model produces non-finite logits; its weights are damaged")
            refs.append(Reference(s.name, s.prompt, cont, logits))
    return refs


# ---------------------------------------------------------------------------------------------
# Export and variants


def _export_fp32(model: Any, model_dir: Path, dest: Path) -> None:
    """optimum export of a loaded fp32 model (no validation here: ours follows)."""
    from optimum.exporters.onnx import onnx_export_from_model

    try:
        onnx_export_from_model(model, dest, task=TASK, do_validation=False, device="cpu")
    except Exception as e:
        raise EdgeftError(f"--model {model_dir}: ONNX export failed: {_one_line(e)}") from None
    if not (dest / ONNX_NAME).is_file():
        raise EdgeftError(f"--model {model_dir}: optimum wrote no {ONNX_NAME}")


def _make_variant(fp32_dir: Path, dest: Path, variant: str) -> dict[str, Any]:
    """Write ``variant`` of ``fp32_dir/model.onnx`` to ``dest``; move config/tokenizer there. Returns settings."""
    for p in fp32_dir.iterdir():  # config, generation config, tokenizer files
        if p.is_file() and not p.name.startswith(ONNX_NAME):
            shutil.move(str(p), dest / p.name)
    src = fp32_dir / ONNX_NAME
    if variant == "int8":
        return quantize_int8(src, dest / ONNX_NAME, INT8)
    if variant == "int4":
        return quantize_int4(src, dest / ONNX_NAME, INT4)
    return convert_fp16(src, dest / ONNX_NAME)


def quantize_int8(src: Path, dest: Path, settings: Int8Settings) -> dict[str, Any]:
    """8-bit weights: MatMulNBits blocks (default) or quantize_dynamic. Returns the settings used."""
    if settings.method == "dynamic":
        return _int8_dynamic(src, dest, settings)
    if settings.method != "weight_only":
        raise ConfigError(f"int8 method {settings.method!r}: expected weight_only or dynamic")
    return _weight_only(src, dest, bits=8, algorithm="rtn", block_size=settings.block_size,
                        symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
                        lm_head_bits=settings.lm_head_bits, embedding=settings.embedding) | {"int8": asdict(settings)}


def quantize_int4(src: Path, dest: Path, settings: Int4Settings) -> dict[str, Any]:
    """4-bit weight-only blocks (MatMulNBits). Returns the settings used."""
    if settings.algorithm not in ("hqq", "rtn"):
        raise ConfigError(f"int4 algorithm {settings.algorithm!r}: expected hqq or rtn")
    return _weight_only(src, dest, bits=4, algorithm=settings.algorithm, block_size=settings.block_size,
                        symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
                        lm_head_bits=settings.lm_head_bits, embedding=settings.embedding) | {"int4": asdict(settings)}


def _weight_only(src: Path, dest: Path, *, bits: int, algorithm: str, block_size: int, symmetric: bool,
                 accuracy_level: int | None, lm_head_bits: int | None, embedding: str) -> dict[str, Any]:
    """MatMulNBitsQuantizer passes: transformer MatMuls at ``bits``, then the logits projection, then the embedding."""
    import onnx

    try:  # onnxruntime's quantizer imports onnx_ir, which onnxruntime does not declare as a dependency
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer
    except ImportError as e:
        raise EdgeftError(f"int{bits} export needs onnxruntime's quantizer ({_one_line(e)}); run `pip install onnx-ir`") from None

    def rtn(model: Any, n_bits: int, **nodes: Any) -> Any:
        q = MatMulNBitsQuantizer(model, bits=n_bits, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",), **nodes)
        q.process()
        return q.model.model

    try:
        model = onnx.load(str(src))
        lm_head = untie_lm_head(model) if lm_head_bits else _lm_head_node(model)
        skip = [lm_head] if lm_head else []
        if algorithm == "hqq":
            config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",))
            q = MatMulNBitsQuantizer(model, nodes_to_exclude=skip, algo_config=config)
            q.process()
            model = q.model.model
            split_float_zero_points(model, accuracy_level)
        else:
            model = rtn(model, bits, nodes_to_exclude=skip)
        if lm_head_bits and lm_head:
            # After the first pass the only float MatMul with a constant weight left is the logits projection.
            model = rtn(model, lm_head_bits, nodes_to_include=[lm_head])
        if embedding == "int4":
            q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                     op_types_to_quantize=("Gather",))
            q.process()
            model = q.model.model
        elif embedding == "fp16":
            embedding_to_fp16(model)
        save_onnx(model, dest)
    except (EdgeftError, MemoryError):
        raise
    except Exception as e:
        raise EdgeftError(f"int{bits} quantization failed: {_one_line(e)}") from None
    how = "HQQ, float zero points split" if algorithm == "hqq" else "DEFAULT, round to nearest"
    return {"method": f"onnxruntime MatMulNBitsQuantizer ({how})", "bits": bits, "algorithm": algorithm,
            "block_size": block_size, "symmetric": symmetric if algorithm == "rtn" else None,
            "accuracy_level": accuracy_level, "lm_head_node": lm_head, "lm_head_bits": lm_head_bits,
            "embedding": embedding}


def _int8_dynamic(src: Path, dest: Path, settings: Int8Settings) -> dict[str, Any]:
    """quantize_dynamic: int8 weights, uint8 activations quantized per tensor on every call."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    work = dest.parent / ".int8-work"
    work.mkdir(exist_ok=True)
    model = onnx.load(str(src))
    lm_head = untie_lm_head(model) if settings.lm_head_bits else _lm_head_node(model)
    exclude = [lm_head] if lm_head and not settings.lm_head_bits else []
    ops = ["MatMul"]
    if settings.embedding == "fp16":
        embedding_to_fp16(model)
    save_onnx(model, work / ONNX_NAME)
    del model
    try:
        quantize_dynamic(work / ONNX_NAME, work / "q.onnx", op_types_to_quantize=ops, per_channel=settings.per_channel,
                         reduce_range=settings.reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                         use_external_data_format=True)  # any size; save_onnx decides the final layout
        save_onnx(onnx.load(str(work / "q.onnx")), dest)
    except Exception as e:
        raise EdgeftError(f"int8 quantization failed: {_one_line(e)}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"method": "onnxruntime.quantization.quantize_dynamic", "bits": 8, "weight_type": "QInt8",
            "excluded_nodes": exclude, "int8": asdict(settings)}


def convert_fp16(src: Path, dest: Path) -> dict[str, Any]:
    """fp16 weights and compute; inputs/outputs stay float32 so the interface matches fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        save_onnx(model, dest)
    except Exception as e:
        raise EdgeftError(f"fp16 conversion failed: {_one_line(e)}") from None
    return {"method": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True}


# ---------------------------------------------------------------------------------------------
# Graph edits used by the quantizers (pure functions of a ModelProto)


def _lm_head_node(model: Any) -> str | None:
    """Name of the MatMul that produces ``logits``."""
    for node in model.graph.node:
        if node.op_type == "MatMul" and "logits" in node.output:
            return node.name
    return None


def untie_lm_head(model: Any) -> str | None:
    """Give the logits MatMul its own (transposed) weight so a quantizer can see a constant B.

    optimum keeps tied embeddings as one initializer read through ``Transpose``; quantizers only
    touch MatMuls whose B is an initializer. Returns the MatMul's name (None if not found).
    """
    from onnx import numpy_helper

    name = _lm_head_node(model)
    if name is None:
        return None
    node = next(n for n in model.graph.node if n.name == name)
    inits = {i.name: i for i in model.graph.initializer}
    if node.input[1] in inits:
        return name  # already a constant
    producer = next((n for n in model.graph.node if node.input[1] in n.output), None)
    if producer is None or producer.op_type != "Transpose" or producer.input[0] not in inits:
        return name
    weight = numpy_helper.to_array(inits[producer.input[0]])  # (V, H)
    new = numpy_helper.from_array(np.ascontiguousarray(weight.T), name="lm_head.weight")  # (H, V)
    model.graph.initializer.append(new)
    node.input[1] = new.name
    if not any(producer.output[0] in n.input for n in model.graph.node):
        model.graph.node.remove(producer)
    return name


def embedding_to_fp16(model: Any) -> str | None:
    """Store the token embedding table as fp16, with a Cast back to float after each lookup.

    The table is the largest 2-D float initializer read only by Gather (a tied lm_head still read
    through Transpose keeps it fp32). Returns its name, or None when there is none.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    tables = [i for i in graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2
              and readers.get(i.name) and all(n.op_type == "Gather" and n.input[0] == i.name for n in readers[i.name])]
    if not tables:
        return None
    init = max(tables, key=lambda i: math.prod(i.dims))
    table = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16")
    graph.initializer.remove(init)
    graph.initializer.append(table)
    for gather in readers[init.name]:
        gather.input[0] = table.name
        out = gather.output[0]
        gather.output[0] = out + "_fp16"
        cast = helper.make_node("Cast", [gather.output[0]], [out], name=gather.name + "_to_float", to=TensorProto.FLOAT)
        graph.node.insert(list(graph.node).index(gather) + 1, cast)
    return init.name


def split_float_zero_points(model: Any, accuracy_level: int | None) -> int:
    """Rewrite 4-bit MatMulNBits nodes with float zero points into uint4 zero points plus an offset term.

    HQQ stores dequantised weights as ``s * (q - z)`` with a float ``z`` per block; onnxruntime's
    fast CPU kernels need integer zero points. With ``zi = round(z)``:
    ``s*(q - z) = s*(q - zi) + s*(zi - z)``, and the second term is constant within a block, so
    ``x @ W = MatMulNBits(x, q, s, zi) + blocksum(x) @ R`` with ``R[b, n] = s[n,b] * (zi[n,b] - z[n,b])``:
    shapes x (..., K), blocksum(x) (..., K/block), R (K/block, N). Exact up to float rounding.
    Returns how many nodes were rewritten.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[Any] = []
    block_sums: dict[tuple[str, int], str] = {}  # (input, block) -> blocksum output: q/k/v share one
    rewritten = 0
    for node in list(graph.node):
        nodes.append(node)
        zp = inits.get(node.input[3]) if node.op_type == "MatMulNBits" and len(node.input) > 3 else None
        if zp is None or zp.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        if bits != 4 or k % block:
            continue  # padded blocks would need a padded blocksum; leave such nodes as they are
        blocks = k // block
        scale = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, blocks)
        zero = numpy_helper.to_array(zp).astype(np.float32).reshape(n, blocks)
        zi = np.clip(np.round(zero), 0, 15).astype(np.uint8)
        offset = np.ascontiguousarray((scale * (zi - zero)).T)  # (blocks, N)
        if blocks % 2:
            zi = np.concatenate([zi, np.zeros((n, 1), np.uint8)], axis=1)
        packed = (zi[:, 0::2] & 0x0F) | ((zi[:, 1::2] & 0x0F) << 4)  # two uint4 per byte, low nibble first
        graph.initializer.remove(zp)
        zp_name = node.input[3] + "_u4"
        graph.initializer.append(numpy_helper.from_array(packed.astype(np.uint8), zp_name))
        node.input[3] = zp_name
        for a in [a for a in node.attribute if a.name == "accuracy_level"]:
            node.attribute.remove(a)
        if accuracy_level:
            node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))

        x = node.input[0]
        if (x, block) not in block_sums:
            shape, axes = f"{node.name}_blocks_shape", f"{node.name}_blocks_axes"
            graph.initializer.extend([numpy_helper.from_array(np.array([0, 0, blocks, block], np.int64), shape),
                                      numpy_helper.from_array(np.array([-1], np.int64), axes)])
            blocked, summed = f"{node.name}_blocks", f"{node.name}_blocksum"
            # Decoder projections read (batch, seq, K): reshape to (batch, seq, K/block, block), sum the block.
            nodes += [helper.make_node("Reshape", [x, shape], [blocked], name=blocked),
                      helper.make_node("ReduceSum", [blocked, axes], [summed], name=summed, keepdims=0)]
            block_sums[(x, block)] = summed
        offset_name, product = f"{node.name}_zp_offset", f"{node.name}_offset_mm"
        graph.initializer.append(numpy_helper.from_array(offset, offset_name))
        out = node.output[0]
        node.output[0] = out + "_nbits"
        nodes += [helper.make_node("MatMul", [block_sums[(x, block)], offset_name], [product], name=product),
                  helper.make_node("Add", [node.output[0], product], [out], name=f"{node.name}_offset_add")]
        rewritten += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    return rewritten


def save_onnx(model: Any, path: Path) -> None:
    """Save a ModelProto, with one external-data file (``model.onnx_data``) when over 2 GB."""
    import onnx

    tensor_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    big = tensor_bytes > EXTERNAL_DATA_BYTES
    for stale in (path, path.with_name(ONNX_DATA_NAME)):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=ONNX_DATA_NAME, size_threshold=1024)


def onnx_size(directory: Path) -> int:
    """Bytes of the ONNX graph and its external data in ``directory``."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name.startswith("model.onnx"))


# ---------------------------------------------------------------------------------------------
# ONNX side: plain onnxruntime driver (the interface in the module docstring)


class OrtLM:
    """Drive an exported decoder with plain ``onnxruntime`` (batch-first, left padding)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_kv_order)
        if not self.past_names:
            raise EdgeftError(f"{path}: the graph has no past_key_values inputs (exported without KV cache)")
        shape = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.kv_dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32
        self.has_position_ids = "position_ids" in inputs
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype) for n in self.past_names}

    def step(self, ids: np.ndarray, mask: np.ndarray,
             past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One call: ids (B, T), mask (B, past + T) → logits (B, T, V) and the new past."""
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64), **past}
        if self.has_position_ids:
            pos = np.cumsum(mask, axis=1) - 1
            feed["position_ids"] = np.where(mask > 0, pos, 1)[:, -ids.shape[1]:].astype(np.int64)
        outs = dict(zip(self.output_names, self.session.run(None, feed)))
        present = {n: outs[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return outs["logits"], present

    def logits(self, seqs: Sequence[Sequence[int]], pad_id: int) -> list[np.ndarray]:
        """Full-sequence logits for a left-padded batch (no cache): one (T_i, V) array per sequence."""
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), pad_id, np.int64)
        mask = np.zeros((len(seqs), width), np.int64)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
        logits, _ = self.step(ids, mask, self.empty_past(len(seqs)))
        return [logits[i, width - len(s):].astype(np.float32) for i, s in enumerate(seqs)]

    def cached_steps(self, prompt: Sequence[int], forced: Sequence[int]) -> np.ndarray:
        """Prefill ``prompt``, then feed ``forced`` one token at a time through the cache.

        Returns the logits that predict each forced token: (len(forced), V).
        """
        ids = np.array([prompt], np.int64)
        mask = np.ones_like(ids)
        logits, past = self.step(ids, mask, self.empty_past(1))
        rows = [logits[0, -1]]
        for tok in forced[:-1]:
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            logits, past = self.step(np.array([[tok]], np.int64), mask, past)
            rows.append(logits[0, -1])
        return np.stack(rows).astype(np.float32)


def _kv_order(name: str) -> tuple[int, str]:
    _, layer, kind = name.split(".")  # past_key_values.{i}.{key|value}
    return int(layer), kind


# ---------------------------------------------------------------------------------------------
# Verification


def verify(onnx_dir: Path, refs: Sequence[Reference], variant: str, *,
           tokenizer: Any) -> tuple[list[Check], dict[str, Any]]:
    """Compare the ONNX model in ``onnx_dir`` with the PyTorch reference; (checks, figures)."""
    figures = measure(onnx_dir, refs, tokenizer)
    return judge(figures, BARS[variant]), figures


def measure(onnx_dir: Path, refs: Sequence[Reference], tokenizer: Any) -> dict[str, Any]:
    """Run the ONNX model on the reference samples: whole sequences, cached decode steps, optimum generate."""
    figures: dict[str, Any] = {"samples": [{"name": r.name, "prompt_tokens": len(r.prompt)} for r in refs],
                               "greedy_tokens": len(refs[0].continuation) if refs else 0}
    try:
        lm = OrtLM(onnx_dir / ONNX_NAME)
    except EdgeftError:
        raise
    except Exception as e:  # e.g. an op without a CPU kernel for this dtype
        figures["error"] = f"onnxruntime (CPU) cannot load the model: {_one_line(e)}"
        return figures
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Whole sequences (prompt + PyTorch's continuation), one left-padded batch, no cache.
    onnx_all = np.concatenate(lm.logits([r.prompt + r.continuation for r in refs], pad))
    figures["logits"] = compare_logits(np.concatenate([r.logits for r in refs]), onnx_all)
    figures["logits_finite"] = bool(np.isfinite(onnx_all).all())
    # Cached decoding: prefill the prompt, then feed the continuation one token at a time.
    steps = [lm.cached_steps(r.prompt, r.continuation) for r in refs]
    figures["kv_cache"] = compare_logits(np.concatenate([r.step_logits for r in refs]), np.concatenate(steps))
    greedy = [s.argmax(-1).tolist() == r.continuation for s, r in zip(steps, refs)]
    figures["kv_cache"]["greedy_match"] = all(greedy)
    figures["kv_cache"]["greedy_match_samples"] = f"{sum(greedy)}/{len(greedy)}"
    del lm
    gc.collect()
    figures["optimum"] = _optimum_generate(onnx_dir, refs)
    figures["tokenizer_roundtrip"] = _tokenizer_matches(onnx_dir, tokenizer)
    return figures


def judge(figures: dict[str, Any], bars: Bars) -> list[Check]:
    """The checks a variant's figures must pass (pure)."""
    if "logits" not in figures:
        return [Check("onnxruntime_loads", False, True, "==")]
    full, kv, opt = figures["logits"], figures["kv_cache"], figures["optimum"]
    checks = [
        Check("logits_finite", figures["logits_finite"], True, "=="),
        Check("top1_agreement", full["top1_agreement"], bars.top1, ">="),
        Check("mean_kl", full["mean_kl"], bars.mean_kl, "<="),
        Check("kv_top1_agreement", kv["top1_agreement"], bars.top1, ">="),
    ]
    if bars.atol is not None:
        checks += [Check("max_abs_diff", full["max_abs_diff"], bars.atol, "<="),
                   Check("kv_max_abs_diff", kv["max_abs_diff"], bars.atol, "<=")]
    if bars.greedy_exact:
        checks += [Check("kv_greedy_match", kv["greedy_match"], True, "=="),
                   Check("optimum_greedy_match", opt["matches_reference"], True, "==")]
    else:
        checks.append(Check("optimum_generates", opt["generated"], True, "=="))
    checks.append(Check("tokenizer_roundtrip", figures["tokenizer_roundtrip"], True, "=="))
    return checks


def _optimum_generate(onnx_dir: Path, refs: Sequence[Reference]) -> dict[str, Any]:
    """Load with ORTModelForCausalLM and greedy-generate with its cache; compare with PyTorch's tokens."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import GenerationConfig

    try:
        model = ORTModelForCausalLM.from_pretrained(onnx_dir, use_cache=True, use_io_binding=False,
                                                    provider="CPUExecutionProvider")
    except Exception as e:
        return {"generated": False, "matches_reference": False, "error": _one_line(e)}
    n = len(refs[0].continuation) if refs else 0
    # No end-of-sequence stop: the reference continuation is raw argmax for exactly n tokens.
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=0, do_sample=False, eos_token_id=None,
                              pad_token_id=model.config.pad_token_id or 0)
    matched, prefix, total = 0, 0, 0
    try:
        for r in refs:
            ids = torch.tensor([r.prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            new = out[0, len(r.prompt):].tolist()
            # generate() may still stop at the model's own end-of-sequence tokens (its generation
            # config fills fields left unset): then the tokens up to that stop must match.
            ref = r.continuation[: len(new)] if len(new) < n and new and new[-1] in _stop_ids(model) else r.continuation
            matched += int(new == ref)
            prefix += next((i for i, (a, b) in enumerate(zip(new, r.continuation)) if a != b), min(len(new), n))
            total += n
    except Exception as e:
        return {"generated": False, "matches_reference": False, "error": _one_line(e)}
    return {"generated": True, "matches_reference": matched == len(refs),
            "matching_samples": f"{matched}/{len(refs)}", "matching_prefix_fraction": prefix / total if total else 1.0}


def _stop_ids(model: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _tokenizer_matches(onnx_dir: Path, tokenizer: Any) -> bool:
    """The tokenizer saved beside the graph encodes the sample texts like the source one."""
    try:
        saved = load_tokenizer(str(onnx_dir))
    except EdgeftError:
        return False
    texts = [t for _, t in SAMPLE_TEXTS]
    return all(saved(t)["input_ids"] == tokenizer(t)["input_ids"] for t in texts) and (
        getattr(saved, "chat_template", None) == getattr(tokenizer, "chat_template", None)
    )


def _size_checks(variant: str, size: int, fp32_size: int) -> list[Check]:
    ratio = BARS[variant].max_size_ratio
    if ratio is None:
        return []
    return [Check("size_ratio_vs_fp32", round(size / fp32_size, 4), ratio, "<=")]


# ---------------------------------------------------------------------------------------------
# Small helpers


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def _one_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence optimum/torch/onnx chatter (Python warnings, library loggers, ORT's C++ log)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import onnxruntime as ort

            ort.set_default_logger_severity(3)
            yield
        finally:
            logging.disable(previous)


class _Progress:
    """A spinner per stage on stderr (rich), each stage's seconds kept in ``timings``."""

    def __init__(self) -> None:
        from edgeft.progress import console

        self.console = console
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, key: str, text: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with self.console.status(text):
            yield
        self.timings[f"{key}_s"] = round(time.perf_counter() - t0, 2)
        self.console.print(f"[green]✓[/] {text} ({self.timings[f'{key}_s']:.1f} s)", highlight=False)

    def done(self, record: Record) -> None:
        mib = record.metrics.get("size_bytes", 0) / 2**20
        colour = "green" if record.status == "passed" else "red"
        self.console.print(f"[{colour}]{record.status}[/] {record.metrics.get('variant')} ONNX, {mib:.1f} MiB", highlight=False)
