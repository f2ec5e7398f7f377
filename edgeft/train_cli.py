"""``edgeft train``: options generated from ``TrainConfig`` so flags, YAML keys and docs agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from edgeft.config import TrainConfig, field_specs, load_yaml, validate


def _options(func):
    for f, tp, _optional in reversed(field_specs()):
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + (f" [default: {f.default}]" if f.default not in (None, "") else "")
        if tp is bool:
            if f.name == "skip_bad_rows":
                decl = [flag, f.name]
            else:
                decl = [f"{flag}/--no-{flag[2:]}", f.name]
            func = click.option(*decl, default=None, help=help_text)(func)
            continue
        choices = f.metadata.get("choices")
        ctype = click.Choice(choices) if choices else {int: int, float: float, str: str}[tp]
        func = click.option(flag, f.name, type=ctype, default=None, help=help_text)(func)
    return func


@click.command("train")
@_options
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None, help="YAML file of options (flags override it).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --output.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output directory.")
@click.pass_context
def train_cmd(ctx: click.Context, config_file: Path | None, resume: bool, overwrite: bool, **flags: Any) -> None:
    """Fine-tune a model (QLoRA by default) on a JSONL/JSON/CSV/TSV data set."""
    values: dict[str, Any] = load_yaml(config_file) if config_file else {}
    for name, value in flags.items():
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            values[name] = value
    cfg = TrainConfig(**values)
    validate(cfg)
    if cfg.split_by:
        from edgeft.train.split import train_split

        train_split(values, cfg, resume=resume,
                    train_one=lambda v, c, resume_task: _train_one(v, c, resume=resume_task, overwrite=overwrite))
        return
    _train_one(values, cfg, resume=resume, overwrite=overwrite)


def _train_one(values: dict[str, Any], cfg: TrainConfig, *, resume: bool, overwrite: bool) -> None:
    """One run: in this process, or as ``--num-processes`` ranks launched for the user."""
    from edgeft.train import train
    from edgeft.train.distributed import is_main_process, under_launcher

    if (cfg.num_processes > 1 or cfg.nnodes > 1) and not under_launcher():
        from edgeft.train.launch import launch_processes

        launch_processes(values, cfg, resume=resume, overwrite=overwrite)  # rank 0 prints the summary
        return
    result = train(cfg, resume=resume, overwrite=overwrite)
    if is_main_process():
        click.echo(result.summary())
