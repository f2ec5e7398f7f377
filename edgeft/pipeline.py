"""``edgeft run --config pipeline.yaml``: train -> merge -> export -> bench in one command.

Every stage writes into its own sub-directory of ``output`` and is skipped when its result is
already complete (a finished training run, a passed verification record, a report), so a
re-run after a crash or Ctrl-C continues where it stopped. Training itself resumes from its
last checkpoint. Every export is calibrated on the training rows (the quantizers and the outlier
smoothing that take them); the ONNX and GGUF exports are also judged on the evaluation rows.
The phone formats (``genai``, ``ort``: ONNX variants; ``executorch``: 8da8w, 8da4w, fp32) are
written as ``genai-V``, ``ort-V`` and ``executorch-V`` and benchmarked beside the others.

Pipeline YAML::

    output: runs/my-pipeline
    train:            # any `edgeft train` option (see edgeft/configs/*.yaml)
      data: my.jsonl
      method: qlora
      max_steps: 200
    merge:
      policy: auto    # auto | base | nf4-dequant
      dtype: fp32
    export:
      onnx: [fp32, int8, int4]
      gguf: [f16, q8_0, q4_k_m]
      genai: [int8]           # phone formats (pip install 'edgeft[mobile]'); none unless listed
      ort: [int8]
      executorch: [8da8w]
    bench:
      data: my-eval.jsonl   # evaluation set (default: train.eval_data, else train.data)
      threads: null
      max_rows: 64
      strict: false
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeft.config import TrainConfig, coerce, validate
from edgeft.core.errors import ConfigError
from edgeft.core.progress import say
from edgeft.core.records import passed_and_bound

ONNX_VARIANTS = ("fp32", "int8", "int4", "fp16")  # what the phone formats take; `onnx:` also takes auto
GGUF_VARIANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "auto")
EXECUTORCH_VARIANTS = ("8da8w", "8da4w", "fp32")
# Phone formats, by export key: (variants, exporter module, its function, modules it needs: the mobile extra).
MOBILE_EXPORTS: dict[str, tuple[tuple[str, ...], str, str, tuple[str, ...]]] = {
    "genai": (ONNX_VARIANTS, "export.genai", "export_genai", ("onnxruntime_genai",)),
    "ort": (ONNX_VARIANTS, "export.ort", "export_ort", ()),
    "executorch": (EXECUTORCH_VARIANTS, "export.executorch", "export_executorch", ("executorch", "torchao")),
}
_SECTIONS = {"output", "train", "merge", "export", "bench"}
_BENCH_INTS = ("repeats", "warmup", "new_tokens", "prompt_tokens", "answer_tokens")


@dataclass
class PipelineConfig:
    output: Path
    train: TrainConfig
    merge_policy: str = "auto"
    merge_dtype: str = "fp32"
    onnx: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    gguf: list[str] = field(default_factory=lambda: ["f16", "q8_0", "q4_k_m"])
    genai: list[str] = field(default_factory=list)  # phone formats: none unless the YAML lists them
    ort: list[str] = field(default_factory=list)
    executorch: list[str] = field(default_factory=list)
    bench_data: str | None = None
    bench_threads: int | None = None
    bench_max_rows: int | None = 64
    strict: bool = False
    max_accuracy_drop: float = 1.0  # points: `gguf: [auto]` / `onnx: [auto]` keep the smallest artifact within it
    bench_extra: dict[str, Any] = field(default_factory=dict)  # other BenchConfig fields (repeats, new_tokens, ...)


def _section(data: dict, name: str, path: Path) -> dict:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: '{name}' must be a mapping")
    return value


def _check_keys(section: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)} (allowed: {', '.join(sorted(allowed))})")


def _variants(value: Any, allowed: tuple[str, ...], where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of names")
    bad = [v for v in value if v.lower() not in allowed]
    if bad:
        raise ConfigError(f"{where}: unknown variant(s) {', '.join(bad)} (allowed: {', '.join(allowed)})")
    return [v.lower() for v in value]


def _mobile_variants(export: dict, path: Path) -> dict[str, list[str]]:
    """export.genai / export.ort / export.executorch: checked variant lists, and the mobile extra
    installed for each format listed (before any stage runs)."""
    import importlib.util

    lists = {}
    for key, (allowed, _, _, modules) in MOBILE_EXPORTS.items():
        lists[key] = _variants(export.get(key), allowed, f"{path}: export.{key}")
        missing = [m for m in modules if lists[key] and importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"{path}: export.{key} needs the mobile extra ({missing[0]} is not installed); "
                              "pip install 'edgeft[mobile]'")
    return lists


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and check a pipeline YAML; every problem names the file and key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    _check_keys(data, _SECTIONS, str(path))
    if not data.get("output"):
        raise ConfigError(f"{path}: 'output' is required")
    out = Path(str(data["output"]))
    train_values = {}
    for k, v in _section(data, "train", path).items():
        name = str(k).replace("-", "_")
        if name in ("output",):
            raise ConfigError(f"{path}: train.output is set by the pipeline (output/adapter)")
        if name == "split_by":
            raise ConfigError(f"{path}: train.split_by: the pipeline trains one adapter; run `edgeft train "
                              "--split-by` for one adapter per task")
        train_values[name] = coerce(name, v, f"{path}: train")
    train = TrainConfig(**train_values)
    train.output = str(out / "adapter")
    validate(train)
    merge = _section(data, "merge", path)
    _check_keys(merge, {"policy", "dtype"}, f"{path}: merge")
    export = _section(data, "export", path)
    _check_keys(export, {"onnx", "gguf", "max_accuracy_drop", *MOBILE_EXPORTS}, f"{path}: export")
    drop = export.get("max_accuracy_drop", 1.0)
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop <= 100:
        raise ConfigError(f"{path}: export.max_accuracy_drop must be a number of points from 0 to 100, got {drop!r}")
    bench = _section(data, "bench", path)
    _check_keys(bench, {"data", "threads", "max_rows", "strict", *_BENCH_INTS}, f"{path}: bench")
    extra = {}
    for k in _BENCH_INTS:
        if k in bench:
            if not isinstance(bench[k], int) or isinstance(bench[k], bool):
                raise ConfigError(f"{path}: bench.{k} must be an integer, got {bench[k]!r}")
            extra[k] = bench[k]
    cfg = PipelineConfig(
        output=out, train=train,
        merge_policy=str(merge.get("policy", "auto")), merge_dtype=str(merge.get("dtype", "fp32")),
        onnx=_variants(export.get("onnx", ["fp32", "int8"]), (*ONNX_VARIANTS, "auto"), f"{path}: export.onnx"),
        gguf=_variants(export.get("gguf", ["f16", "q8_0", "q4_k_m"]), GGUF_VARIANTS, f"{path}: export.gguf"),
        bench_data=bench.get("data") or train.eval_data or train.data,
        bench_threads=bench.get("threads"), bench_max_rows=bench.get("max_rows", 64), strict=bool(bench.get("strict", False)),
        bench_extra=extra, max_accuracy_drop=float(drop), **_mobile_variants(export, path),
    )
    if cfg.merge_policy not in ("auto", "base", "nf4-dequant"):
        raise ConfigError(f"{path}: merge.policy must be auto, base or nf4-dequant")
    if cfg.merge_dtype not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"{path}: merge.dtype must be fp32, fp16 or bf16")
    if cfg.bench_data and not Path(cfg.bench_data).is_file():
        raise ConfigError(f"{path}: bench.data {cfg.bench_data}: file not found")
    return cfg


def artifact_paths(cfg: PipelineConfig) -> list[Path]:
    out = cfg.output
    paths = [out / "merged"]
    paths += [out / f"onnx-{v}" for v in cfg.onnx]
    paths += [out / f"model.{v}.gguf" for v in cfg.gguf]
    paths += [target for _, _, target in mobile_targets(cfg)]
    return paths


def mobile_targets(cfg: PipelineConfig) -> list[tuple[str, str, Path]]:
    """(export key, variant, output directory) of every phone-format artifact, e.g. ``output/genai-int8``."""
    return [(key, v, cfg.output / f"{key}-{v}") for key in MOBILE_EXPORTS for v in getattr(cfg, key)]


def _eval_data(cfg: PipelineConfig) -> Path | None:
    """The evaluation rows the exports are judged on: the bench's data, else training's held-out file."""
    data = cfg.bench_data or cfg.train.eval_data
    if not data or Path(data).resolve() == Path(cfg.train.data).resolve():
        return None  # no held-out rows: the generic samples decide
    return Path(data)


def stages(cfg: PipelineConfig) -> list[tuple[str, Callable[[], bool], Callable[[], None]]]:
    """(name, is_done, run) for every stage, in order."""
    out = cfg.output
    adapter, merged = out / "adapter", out / "merged"

    def train_done() -> bool:
        rec = adapter / "edgeft-run.json"
        return rec.is_file() and json.loads(rec.read_text()).get("status") == "completed"

    def run_train() -> None:
        from edgeft.train import latest_checkpoint, train

        resume = latest_checkpoint(adapter) is not None
        train(cfg.train, resume=resume, overwrite=not resume)

    def run_merge() -> None:
        from edgeft.merge import merge_adapter

        rec = merge_adapter(adapter, merged, policy=cfg.merge_policy, dtype=cfg.merge_dtype, overwrite=True)
        _verdict(rec)

    result: list[tuple[str, Callable[[], bool], Callable[[], None]]] = [
        ("train", train_done, run_train), ("merge", lambda: passed_and_bound(merged), run_merge)]
    for v in cfg.onnx:
        target = out / f"onnx-{v}"

        def run_onnx(v=v, target=target) -> None:
            from export.onnx import export_onnx

            if v == "auto":  # calibrated on the training rows, judged on the evaluation rows
                from export.onnx.auto import export_onnx_auto

                _verdict(export_onnx_auto(merged, target, max_accuracy_drop=cfg.max_accuracy_drop, overwrite=True,
                                          eval_data=_eval_data(cfg), calibration=Path(cfg.train.data)))
                return
            _verdict(export_onnx(merged, target, quantize=None if v == "fp32" else v, overwrite=True,
                                 eval_data=_eval_data(cfg), calibration=Path(cfg.train.data)))

        result.append((f"export onnx {v}", lambda t=target: passed_and_bound(t), run_onnx))
    for v in cfg.gguf:
        target = out / f"model.{v}.gguf"

        def run_gguf(v=v, target=target) -> None:
            from export.gguf import export_gguf

            # calibrated on the training rows, judged on the evaluation rows
            if v == "auto":
                from export.gguf.auto import export_gguf_auto

                _verdict(export_gguf_auto(merged, target, max_accuracy_drop=cfg.max_accuracy_drop, overwrite=True,
                                          eval_data=_eval_data(cfg), calibration=Path(cfg.train.data)))
                return
            _verdict(export_gguf(merged, target, qtype=v, overwrite=True, calibration=Path(cfg.train.data),
                                 eval_data=_eval_data(cfg)))

        result.append((f"export gguf {v}", lambda t=target: passed_and_bound(t), run_gguf))
    result += _mobile_stages(cfg, merged)
    report = out / "bench" / "report.json"

    def run_bench() -> None:
        from runtime.bench import BenchConfig, run_bench

        artifacts = [p for p in artifact_paths(cfg) if passed_and_bound(p)]
        if not artifacts:
            say("  [yellow]no artifact passed verification; nothing to benchmark[/]")
            return
        run_bench(BenchConfig(reference=adapter, artifacts=artifacts, data=Path(cfg.bench_data), output=out / "bench",
                              threads=cfg.bench_threads, max_rows=cfg.bench_max_rows, strict=cfg.strict,
                              overwrite=True, **cfg.bench_extra))

    def bench_done() -> bool:
        """A report that covers every artifact now passing verification."""
        if not report.is_file():
            return False
        try:
            covered = {str(Path(e["path"]).resolve()) for e in json.loads(report.read_text())["entries"]}
        except (ValueError, KeyError, TypeError):
            return False
        return {str(p.resolve()) for p in artifact_paths(cfg) if passed_and_bound(p)} <= covered

    result.append(("bench", bench_done, run_bench))
    return result


def _mobile_stages(cfg: PipelineConfig, merged: Path) -> list[tuple[str, Callable[[], bool], Callable[[], None]]]:
    """(name, is_done, run) of each phone-format export: smoothed on the training rows where the variant
    takes them (int8, 8da8w, 8da4w), judged on the verification samples (these exporters take no eval rows)."""
    result: list[tuple[str, Callable[[], bool], Callable[[], None]]] = []
    for key, v, target in mobile_targets(cfg):

        def run_mobile(key=key, v=v, target=target) -> None:
            import importlib

            _, module, function, _ = MOBILE_EXPORTS[key]
            export = getattr(importlib.import_module(module), function)
            _verdict(export(merged, target, quantize=v, overwrite=True, calibration=Path(cfg.train.data)))

        result.append((f"export {key} {v}", lambda t=target: passed_and_bound(t), run_mobile))
    return result


def _verdict(rec: Any) -> None:
    say(f"  {rec.summary()}")
    if rec.status != "passed":
        say(f"  [yellow]{rec.artifact} failed verification; it is kept, marked failed, and left out of the benchmark[/]")


def run_pipeline(cfg: PipelineConfig) -> None:
    cfg.output.mkdir(parents=True, exist_ok=True)
    todo = stages(cfg)
    for i, (name, done, run) in enumerate(todo, 1):
        if done():
            say(f"[dim][{i}/{len(todo)}] {name}: already complete, skipped[/]")
            continue
        say(f"[bold cyan][{i}/{len(todo)}] {name}[/]")
        run()
