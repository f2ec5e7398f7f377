"""The ``edgeft`` command line: a thin table of commands.

Each command parses options, builds a typed config and calls one entry function; heavy
libraries are imported inside those functions so ``edgeft --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from edgeft import __version__
from edgeft.core.errors import OOM_HINT, VerificationFailed


def _quiet_libraries() -> None:
    # Library chatter (advisories, deprecations) is noise in a CLI; errors still surface.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging
    import warnings

    # bitsandbytes warns at import when an optional hub-hosted CPU kernel is absent; the
    # built-in kernel is used instead, so the warning is noise here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers imports torchao (the mobile extra) when it is installed; its optional CUDA kernels fail
    # to load on CPU builds and torch deprecates how it registers enums: both warnings are noise.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

    warnings.filterwarnings("ignore")


def _report(record) -> None:
    """Print an artifact's verdict; a failed verification is a non-zero exit."""
    from edgeft.core.records import record_path

    click.echo(f"{record.artifact}: {record.summary()}")
    click.echo(f"verification record: {record_path(record.artifact)}")
    if record.status != "passed":
        raise VerificationFailed(f"{record.artifact} failed verification; the record marks it failed")


class EdgeftGroup(click.Group):
    """A group whose errors are one line on stderr with a non-zero exit, never a traceback."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # type: ignore[override]
        try:
            rc = super().main(*args, standalone_mode=False, **kwargs)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("edgeft: interrupted", err=True)
            sys.exit(130)
        except click.ClickException as e:
            click.echo(f"edgeft: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except MemoryError:
            click.echo(f"edgeft: error: {OOM_HINT}", err=True)
            sys.exit(1)
        except Exception as e:  # a bug, not bad input: still one line, with a way to see more
            if os.environ.get("EDGEFT_DEBUG"):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:300]
            click.echo(f"edgeft: internal error: {type(e).__name__}: {first} (set EDGEFT_DEBUG=1 for the traceback)", err=True)
            sys.exit(70)
        sys.exit(rc if isinstance(rc, int) else 0)


@click.group(cls=EdgeftGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgeft")
def cli() -> None:
    """Fine-tune (QLoRA/LoRA/full), merge, export to ONNX and GGUF, and verify every artifact."""
    _quiet_libraries()


@cli.command("import-gguf")
@click.argument("gguf_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), help="Directory to write (default: the edgeft cache).")
@click.option("--overwrite", is_flag=True, help="Convert again even if the output exists.")
def import_gguf_cmd(gguf_file: Path | None, output: Path | None, overwrite: bool) -> None:
    """Convert a GGUF file (default: the embedded SmolLM2-135M-Instruct) into a Hugging Face model directory."""
    from edgeft.models import default_gguf_path, import_gguf

    path = import_gguf(gguf_file or default_gguf_path(), output, overwrite=overwrite)
    click.echo(str(path))


from edgeft.train_cli import train_cmd  # noqa: E402  (kept in its own module: many options)

cli.add_command(train_cmd)


@cli.command("merge")
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="Adapter directory from `edgeft train` (or any PEFT LoRA adapter).")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Merged model directory to write.")
@click.option("--base", default=None, help="Base model (default: the one recorded with the adapter).")
@click.option("--policy", type=click.Choice(["auto", "base", "nf4-dequant"]), default="auto", show_default=True,
              help="Merge into the original 16-bit base weights, or into the 4-bit-dequantized weights the adapter was trained against; auto picks by the README's measurement.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True, help="dtype of the merged weights.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def merge_cmd(adapter: Path, output: Path, base: str | None, policy: str, dtype: str, overwrite: bool) -> None:
    """Merge a LoRA adapter into a 16-bit base model and verify it against the unmerged model."""
    from edgeft.merge import merge_adapter

    _report(merge_adapter(adapter, output, base=base, policy=policy, dtype=dtype, overwrite=overwrite))


@cli.group("export")
def export_group() -> None:
    """Export a merged model to ONNX (optimum, GenAI, ORT format), GGUF or ExecuTorch (each verified against PyTorch)."""


ONNX_FORMATS = {"onnx": ("export.onnx", "export_onnx"), "genai": ("export.genai", "export_genai"),
                "ort": ("export.ort", "export_ort")}


@export_group.command("onnx")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Merged model directory.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="ONNX output directory.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4", "fp16", "auto"]), default="none", show_default=True,
              help="Edge variant; auto: the smallest variant within --max-accuracy-drop on --eval-data.")
@click.option("--format", "fmt", type=click.Choice(list(ONNX_FORMATS)), default="onnx", show_default=True,
              help="onnx: optimum folder; genai: ONNX Runtime GenAI folder (genai_config.json); ort: ORT-format model "
                   "+ required-operators config for onnxruntime mobile.")
@click.option("--eval-data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Your evaluation rows: verification then decides on them (agreement and task accuracy).")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Rows the model will see (normally the training data; never the evaluation rows): int4 is rounded "
                   "by GPTQ on them, int8 finds the MatMuls that read massive activations on them (else on sample "
                   "texts), and --gptq/--smooth use them.")
@click.option("--smooth/--no-smooth", default=None,
              help="Fold the outlier smoothing into the weights before quantizing (int8/int4; needs --calibration).")
@click.option("--gptq/--no-gptq", default=None,
              help="int8/int4: round the decoder's weights onto the variant's grid by GPTQ on --calibration rows "
                   "(error-compensated; stored unchanged by onnxruntime's quantizer, checked in the record). "
                   "Default: as the variant's table row says when --calibration is given.")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), default=1.0, show_default=True,
              help="--quantize auto: task accuracy points the variant kept may lose against the merged model "
                   "(judged on the upper end of the 95% interval over your --eval-data rows).")
@click.option("--activation-bits", type=click.Choice(["8", "16"]), default="8", show_default=True,
              help="int8/int4: 8 = onnxruntime's int8 kernels round each MatMul input to 8-bit blocks; 16 = each input "
                   "goes in as that rounding plus its remainder, two rows of one call (same file; agreement up, "
                   "decode slower).")
@click.option("--eight-bit", "eight_bit", multiple=True, metavar="PATTERN",
              help="int4: also keep the linear layers whose PyTorch module name matches this regular expression at "
                   "8 bits (repeatable; e.g. up_proj, or layers\\.0\\.mlp). The default keeps down_proj, v_proj "
                   "and k_proj.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def export_onnx_cmd(model: Path, output: Path, quantize: str, fmt: str, eval_data: Path | None,
                    calibration: Path | None, smooth: bool | None, gptq: bool | None, max_accuracy_drop: float,
                    activation_bits: str, eight_bit: tuple[str, ...], overwrite: bool) -> None:
    """Export to ONNX with KV cache (optimum), optionally quantized, and verify.

    --quantize auto tries int4 and int8 (with --calibration: int4 GPTQ-rounded, int8 also smoothed + GPTQ)
    on --eval-data and keeps the smallest within --max-accuracy-drop points of the merged model; the
    frontier is in the record.
    """
    import importlib

    from edgeft.core.errors import ConfigError

    if eval_data is not None and fmt != "onnx":
        raise ConfigError(f"--eval-data: only with --format onnx (not {fmt})")
    if quantize == "auto":
        if fmt != "onnx":
            raise ConfigError(f"--quantize auto: only with --format onnx (not {fmt})")
        if smooth is not None or gptq is not None or eight_bit:
            flag = ("--smooth/--no-smooth" if smooth is not None else "--gptq/--no-gptq" if gptq is not None
                    else "--eight-bit")
            raise ConfigError(f"{flag}: --quantize auto measures the calibrated candidates itself")
        from export.onnx.auto import export_onnx_auto

        _report(export_onnx_auto(model, output, max_accuracy_drop=max_accuracy_drop, eval_data=eval_data,
                                 calibration=calibration, overwrite=overwrite, activation_bits=int(activation_bits)))
        return
    module, name = ONNX_FORMATS[fmt]
    export = getattr(importlib.import_module(module), name)
    extra = {"eval_data": eval_data} if eval_data is not None else {}
    record = export(model, output, quantize=None if quantize == "none" else quantize, overwrite=overwrite,
                    calibration=calibration, smooth=smooth, gptq=gptq, activation_bits=int(activation_bits),
                    eight_bit=eight_bit, **extra)
    agreement = {"top1_agreement", "mean_kl"}
    if quantize in ("int8", "int4") and activation_bits == "8" and any(
            c.name in agreement and not c.passed for c in record.checks):
        click.echo("hint: --activation-bits 16 keeps the same weights and lets onnxruntime's int8 kernels see "
                   "16-bit inputs (benchmarks/QUANTIZATION.md, \"ONNX int8 with 16-bit activations\"); decoding is slower")
    _report(record)


@export_group.command("executorch")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Merged model directory.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Output directory (model.pte + tokenizer).")
@click.option("--quantize", type=click.Choice(["8da8w", "8da4w", "fp32"]), default="8da4w", show_default=True,
              help="8da8w: int8 dynamic activations, int8 weights (per output channel); 8da4w: int8 dynamic "
                   "activations, int4 weights (groups of 32); fp32: no quantization.")
@click.option("--max-seq-len", type=int, default=512, show_default=True, help="KV cache length built into the program.")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Rows the model will see (normally the training data; never the evaluation rows): 8da8w and "
                   "8da4w are smoothed on them (outlier activations folded into the weights, exact).")
@click.option("--smooth/--no-smooth", default=None,
              help="Force the outlier smoothing on or off (default: on for 8da8w and 8da4w when --calibration is given).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def export_executorch_cmd(model: Path, output: Path, quantize: str, max_seq_len: int, calibration: Path | None,
                          smooth: bool | None, overwrite: bool) -> None:
    """Export an ExecuTorch program (.pte, XNNPACK) for phones, and verify it with executorch's runtime."""
    from export.executorch import export_executorch

    _report(export_executorch(model, output, quantize=quantize, max_seq_len=max_seq_len, overwrite=overwrite,
                              calibration=calibration, smooth=smooth))


GGUF_TYPES = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "auto"]


def _tensor_types(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple:
    """``--tensor-type NAME=TYPE`` values as (regex, GGML type) pairs; a bad one is a usage error."""
    from export.gguf.tables import parse_tensor_type

    try:
        return tuple(parse_tensor_type(v) for v in values)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@export_group.command("gguf")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Merged model directory.")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="GGUF file to write.")
@click.option("--type", "qtype", type=click.Choice(GGUF_TYPES, case_sensitive=False), default="f16", show_default=True, help="llama.cpp tensor type.")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Rows to calibrate the quantizer on (an importance matrix; the outlier smoothing and --gptq use "
                   "them too), normally the training data.")
@click.option("--eval-data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Your evaluation rows: verification then decides on them (agreement and task accuracy).")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), default=1.0, show_default=True,
              help="--type auto: task accuracy points the smallest file kept may lose against the merged model "
                   "(judged on the upper end of the 95% interval over your --eval-data rows).")
@click.option("--smooth/--no-smooth", default=None,
              help="Force the outlier smoothing (exact, folded into the weights; needs --calibration) on or off "
                   "(default: the type's measured choice).")
@click.option("--gptq/--no-gptq", default=None,
              help="q8_0: round the weights onto q8_0's grid by GPTQ on --calibration rows (error-compensated; "
                   "default: off, the type's measured choice).")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="NAME=TYPE", callback=_tensor_types,
              help="Store the tensors whose GGUF name matches the regular expression NAME in TYPE (f16, bf16, q8_0, "
                   "...), as llama-quantize's flag does; repeatable, first match wins, before the type's own choices. "
                   "E.g. ffn_up=f16 buys agreement with bytes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def export_gguf_cmd(model: Path, output: Path, qtype: str, calibration: Path | None, eval_data: Path | None,
                    max_accuracy_drop: float, smooth: bool | None, gptq: bool | None, tensor_types: tuple,
                    overwrite: bool) -> None:
    """Export to GGUF for llama.cpp (and write an Ollama Modelfile), and verify.

    --type auto tries the quantized types (with and without calibration: importance matrix, GPTQ) on --eval-data and
    keeps the smallest within --max-accuracy-drop; the frontier is saved as FILE.frontier.png.
    """
    if qtype.lower() == "auto":
        from export.gguf.auto import export_gguf_auto

        if tensor_types:
            raise click.BadParameter("--type auto chooses every tensor's type itself; drop --tensor-type",
                                     param_hint="--tensor-type")

        _report(export_gguf_auto(model, output, max_accuracy_drop=max_accuracy_drop, eval_data=eval_data,
                                 calibration=calibration, overwrite=overwrite))
        return
    from export.gguf import export_gguf
    from export.gguf.tables import QuantOptions

    _report(export_gguf(model, output, qtype=qtype.lower(), overwrite=overwrite, calibration=calibration,
                        eval_data=eval_data,
                        quant_options=QuantOptions(smooth=smooth, gptq=gptq, tensor_types=tensor_types)))


@export_group.command("gguf-lora")
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="LoRA adapter directory (from `edgeft train`).")
@click.option("--base", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The verified base GGUF the adapter will run on.")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Adapter file to write (TASK.lora.gguf).")
@click.option("--eval-data", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The task's evaluation rows: verification then decides on them (agreement and task accuracy).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def export_gguf_lora_cmd(adapter: Path, base: Path, output: Path, eval_data: Path | None, overwrite: bool) -> None:
    """Export a LoRA adapter in llama.cpp's GGUF adapter format, verified on the base GGUF."""
    from export.gguf_lora import export_gguf_lora

    _report(export_gguf_lora(adapter, base, output, overwrite=overwrite, eval_data=eval_data))


from runtime.cli_bench import bench_cmd  # noqa: E402  (numpy + click only at import)

cli.add_command(bench_cmd)

from runtime.cli_eval import eval_cmd  # noqa: E402  (click only at import)

cli.add_command(eval_cmd)

from edgeft.datatools.cli import data_group  # noqa: E402  (click only at import)

cli.add_command(data_group)


@cli.command("serve")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback only unless you change it).")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port (0: any free port).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="A task adapter: a .lora.gguf file (`edgeft export gguf-lora`) on a GGUF base, or an adapter "
                   "directory (`edgeft train`) on the model directory it was trained from; requests select it with "
                   "model=NAME. Repeatable.")
@click.option("--slots", type=int, default=1, show_default=True, help="Requests decoded at the same time (weights shared).")
@click.option("--queue", type=int, default=16, show_default=True, help="Requests that may wait for a slot; beyond that 429.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds a request may take, queueing included.")
@click.option("--threads", type=int, default=None, help="Engine threads per slot (default: cores / slots).")
@click.option("--ctx", type=int, default=2048, show_default=True, help="Context per slot, capped at the model's own.")
@click.option("--max-tokens", type=int, default=256, show_default=True, help="Answer length when a request gives none.")
@click.option("--max-prompt-tokens", type=int, default=None, help="Longest prompt accepted (default: the context).")
@click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True, help="Largest request body.")
@click.option("--api-key", envvar="EDGEFT_API_KEY", default=None, help="Require 'Authorization: Bearer KEY' (or set EDGEFT_API_KEY).")
@click.option("--name", default=None, help="Model id clients send (default: the artifact's name).")
@click.option("--allow-unverified", is_flag=True, help="Serve an artifact whose verification record is missing, failed or stale.")
def serve_cmd(artifact: Path, adapters: tuple[str, ...], **options) -> None:
    """Serve an artifact (GGUF, ONNX, merged model, adapter) over an OpenAI-compatible HTTP API."""
    from runtime.serve import ServeConfig, parse_adapters, serve

    serve(ServeConfig(artifact=artifact, adapters=parse_adapters(adapters), **options), announce=click.echo)


@cli.command("run")
@click.option("--config", "config_file", required=True, type=click.Path(path_type=Path), help="Pipeline YAML (see README).")
def run_cmd(config_file: Path) -> None:
    """Train -> merge -> export -> bench in one command; finished stages are skipped on re-run."""
    from edgeft.pipeline import load_pipeline, run_pipeline

    cfg = load_pipeline(config_file)
    run_pipeline(cfg)
    click.echo(f"pipeline complete: {cfg.output}")


@cli.command("demo")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Where the demo writes its task, adapter, merged model, exports and summary.")
@click.option("--steps", type=int, default=40, show_default=True, help="QLoRA optimizer steps.")
@click.option("--overwrite", is_flag=True, help="Start over instead of resuming finished stages.")
def demo_cmd(output: Path, steps: int, overwrite: bool) -> None:
    """The whole pipeline on the embedded SmolLM2-135M-Instruct and a built-in task (resumable)."""
    from edgeft.demo import run_demo

    s = run_demo(output, steps=steps, overwrite=overwrite)
    click.echo(f"task accuracy: {s.get('accuracy_before', float('nan')):.1%} before -> "
               f"{s.get('accuracy_after', float('nan')):.1%} after fine-tuning; summary: {output / 'demo.json'}")


def main() -> None:
    """Console entry point."""
    cli.main()


if __name__ == "__main__":
    main()
