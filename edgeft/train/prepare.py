"""Everything a run needs before weights load, and everything that can fail on bad input: rows
read and tokenized, the train/eval split, the model reference checked, the device chosen.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from edgeft.config import TrainConfig
from edgeft.core.errors import EdgeftError
from edgeft.core.progress import say
from edgeft.core.rows import LoadReport, load_rows
from edgeft.data import Tokenized, TokenStats, split_eval, tokenize_rows
from edgeft.train.model import check_bitsandbytes, pick_device


class Prepared(NamedTuple):
    """The inputs of a run, checked (a tuple, so it unpacks in this order)."""

    model_ref: str
    device: str
    dtype: Any
    tok: Any
    train_examples: list[Tokenized]
    eval_examples: list[Tokenized]
    stats: TokenStats
    report: LoadReport

    def describe_data(self, cfg: TrainConfig) -> str:
        """One line on the data as the run will see it."""
        stats = self.stats
        return (f"data: {stats.examples} rows ({self.report.schema}), {len(self.train_examples)} train / "
                f"{len(self.eval_examples)} eval, {stats.truncated} truncated to {cfg.max_seq_len} tokens, "
                f"{stats.dropped_no_target} dropped (no response left)")


def prepare_inputs(cfg: TrainConfig) -> Prepared:
    """Everything that can fail on bad input, before any weights load."""
    from edgeft.models import check_weights_safe, resolve_model
    from runtime.modelfiles import load_tokenizer

    rows, report = load_rows(cfg.data, cfg.schema, skip_bad=cfg.skip_bad_rows)
    if report.skipped:
        say(f"[yellow]skipped {len(report.skipped)} bad rows[/] (first: {report.skipped[0]})")
    if cfg.task_weights:
        from edgeft.config import parse_task_weights
        from edgeft.train.mixing import check_task_rows

        check_task_rows(rows, parse_task_weights(cfg.task_weights), cfg.data)
    eval_rows = None
    if cfg.eval_data:
        eval_rows, eval_report = load_rows(cfg.eval_data, cfg.schema, skip_bad=cfg.skip_bad_rows)
        report.skipped += eval_report.skipped
    model_ref = resolve_model(cfg.model)
    check_weights_safe(model_ref, allow_pickle=cfg.allow_pickle, flag="--allow-pickle")
    device, dtype = pick_device(cfg)
    if cfg.method == "qlora":
        check_bitsandbytes(device)
    tok = load_tokenizer(model_ref, trust_remote_code=cfg.trust_remote_code)
    examples, stats = tokenize_rows(tok, rows, cfg.max_seq_len)
    if not examples:
        raise EdgeftError(f"{cfg.data}: no row has response tokens left within --max-seq-len {cfg.max_seq_len}")
    if eval_rows is not None:
        eval_examples, _ = tokenize_rows(tok, eval_rows, cfg.max_seq_len)
        train_examples = examples
    else:
        train_examples, eval_examples = split_eval(examples, cfg.eval_split, cfg.seed)
    return Prepared(model_ref, device, dtype, tok, train_examples, eval_examples, stats, report)
