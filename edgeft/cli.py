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
    """Export a merged model to ONNX or GGUF (each export is verified against PyTorch)."""


@export_group.command("onnx")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Merged model directory.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="ONNX output directory.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4", "fp16"]), default="none", show_default=True, help="Edge variant.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def export_onnx_cmd(model: Path, output: Path, quantize: str, overwrite: bool) -> None:
    """Export to ONNX with KV cache (optimum), optionally quantized, and verify."""
    from export.onnx import export_onnx

    _report(export_onnx(model, output, quantize=None if quantize == "none" else quantize, overwrite=overwrite))


GGUF_TYPES = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"]


@export_group.command("gguf")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Merged model directory.")
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="GGUF file to write.")
@click.option("--type", "qtype", type=click.Choice(GGUF_TYPES, case_sensitive=False), default="f16", show_default=True, help="llama.cpp tensor type.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def export_gguf_cmd(model: Path, output: Path, qtype: str, overwrite: bool) -> None:
    """Export to GGUF for llama.cpp (and write an Ollama Modelfile), and verify."""
    from export.gguf import export_gguf

    _report(export_gguf(model, output, qtype=qtype.lower(), overwrite=overwrite))


from runtime.cli_bench import bench_cmd  # noqa: E402  (numpy + click only at import)

cli.add_command(bench_cmd)


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
