"""``edgeft data stats|convert|clean|split``: Click commands that parse options into a config and
call one entry function each. Registered in ``edgeft/cli.py``; the work is imported when a command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

_SCHEMAS = ["auto", "instruction", "chat", "sharegpt", "prompt-completion", "text"]
_FILE = click.Path(dir_okay=False, path_type=Path)


def _columns(_ctx, _param, value: str | None) -> tuple[str, ...]:
    return tuple(c.strip() for c in value.split(",") if c.strip()) if value else ()


def _near_dup_options(func):
    func = click.option("--num-perm", type=int, default=128, show_default=True,
                        help="MinHash permutations (more: a sharper similarity estimate, more memory).")(func)
    func = click.option("--near-dup-threshold", type=float, default=0.8, show_default=True,
                        help="Estimated Jaccard similarity of shingles at which two rows are near duplicates.")(func)
    return click.option("--near-dup/--no-near-dup", default=True, show_default=True,
                        help="Find near duplicates with MinHash-LSH (datasketch).")(func)


def _common(func):
    func = click.option("--skip-bad-rows", is_flag=True, help="Skip unreadable or invalid rows and report them.")(func)
    func = click.option("--overwrite", is_flag=True, help="Replace existing outputs.")(func)
    return click.option("--schema", type=click.Choice(_SCHEMAS), default="auto", show_default=True,
                        help="Input schema; auto detects it from the first row.")(func)


@click.group("data")
def data_group() -> None:
    """Prepare data: stats, convert, clean, split. Inputs are never modified; each writes a report."""


@data_group.command("stats")
@click.argument("file", type=_FILE)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for stats.report.{json,md} and token_lengths.png [default: FILE's name + .stats].")
@click.option("--model", default=None, help="Tokenizer for token lengths: model or tokenizer directory, .gguf, "
                                            "Hub id [default: the embedded model].")
@click.option("--no-tokens", is_flag=True, help="Skip token lengths (no tokenizer is loaded).")
@click.option("--max-seq-len", type=int, default=512, show_default=True, help="Count rows longer than this (tokens).")
@click.option("--label-field", default=None, help="Field whose value distribution to report (e.g. output, label).")
@_near_dup_options
@_common
def stats_cmd(file: Path, output: Path | None, model: str | None, no_tokens: bool, max_seq_len: int,
              label_field: str | None, near_dup: bool, near_dup_threshold: float, num_perm: int, schema: str,
              overwrite: bool, skip_bad_rows: bool) -> None:
    """Rows, schema, token lengths (PNG histogram), truncation, duplicates and labels of FILE."""
    from edgeft.datatools.stats import StatsConfig, data_stats

    data_stats(StatsConfig(source=file, output=output or file.with_name(file.stem + ".stats"), model=model,
                           tokens=not no_tokens, max_seq_len=max_seq_len, label_field=label_field, schema=schema,
                           near_dup=near_dup, near_dup_threshold=near_dup_threshold, num_perm=num_perm,
                           overwrite=overwrite, skip_bad_rows=skip_bad_rows))


@data_group.command("convert")
@click.argument("file", type=_FILE)
@click.option("--to", "to", required=True, type=click.Choice(["instruction", "chat", "sharegpt", "prompt-completion", "text"]),
              help="Schema to write.")
@click.option("--output", required=True, type=_FILE, help="JSON Lines file to write (report beside it).")
@click.option("--template", default=None, help='Prompt from raw columns, e.g. "Classify the sentiment: {sentence}".')
@click.option("--output-col", default=None, help="Column holding the answer (with --template).")
@click.option("--label-map", default=None, help="Answer values to labels, e.g. 0=negative,1=positive.")
@click.option("--system", default=None, help="System message for templated rows.")
@_common
def convert_cmd(file: Path, to: str, output: Path, template: str | None, output_col: str | None,
                label_map: str | None, system: str | None, schema: str, overwrite: bool, skip_bad_rows: bool) -> None:
    """Convert FILE (any trainer schema, or raw columns with --template) into another schema."""
    from edgeft.datatools.convert import ConvertConfig, convert_file, parse_label_map

    convert_file(ConvertConfig(source=file, output=output, to=to, overwrite=overwrite, schema=schema,
                               template=template, output_col=output_col, label_map=parse_label_map(label_map),
                               system=system, skip_bad_rows=skip_bad_rows))


@data_group.command("clean")
@click.argument("file", type=_FILE)
@click.option("--output", required=True, type=_FILE, help="JSON Lines file to write (report beside it).")
@click.option("--columns", callback=_columns, default=None,
              help="Text columns of a raw table, comma-separated (instead of a trainer schema).")
@click.option("--normalize", "normal_form", type=click.Choice(["NFKC", "NFC", "none"]), default="NFKC", show_default=True,
              help="Unicode normal form.")
@click.option("--strip-html/--keep-html", default=True, show_default=True, help="Remove HTML tags, decode entities.")
@click.option("--min-chars", type=int, default=1, show_default=True, help="Drop rows with fewer characters.")
@click.option("--max-chars", type=int, default=None, help="Drop rows with more characters.")
@click.option("--min-tokens", type=int, default=None, help="Drop rows with fewer tokens (--model's tokenizer).")
@click.option("--max-tokens", type=int, default=None, help="Drop rows with more tokens (--model's tokenizer).")
@click.option("--model", default=None, help="Tokenizer for the token bounds [default: the embedded model].")
@click.option("--max-repetition", type=float, default=0.5, show_default=True,
              help="Drop rows whose share of repeated word 3-grams is above this (1 turns it off).")
@click.option("--max-symbol-ratio", type=float, default=0.5, show_default=True,
              help="Drop rows whose share of symbol characters is above this (1 turns it off).")
@click.option("--language", "languages", callback=_columns, default=None,
              help="Keep only rows in these languages, ISO 639-1 codes comma-separated (e.g. en or en,de; py3langid).")
@click.option("--min-language-confidence", type=float, default=0.5, show_default=True,
              help="With --language: drop rows whose detected language has a lower probability.")
@click.option("--dedup/--no-dedup", default=True, show_default=True, help="Drop exact duplicates (normalised text).")
@_near_dup_options
@_common
def clean_cmd(file: Path, output: Path, columns: tuple[str, ...], normal_form: str, strip_html: bool, min_chars: int,
              max_chars: int | None, min_tokens: int | None, max_tokens: int | None, model: str | None,
              max_repetition: float, max_symbol_ratio: float, languages: tuple[str, ...],
              min_language_confidence: float, dedup: bool, near_dup: bool, near_dup_threshold: float,
              num_perm: int, schema: str, overwrite: bool, skip_bad_rows: bool) -> None:
    """Clean FILE's text, filter by length, quality and language, drop exact and near duplicates."""
    from edgeft.datatools.clean import CleanConfig, clean_file

    clean_file(CleanConfig(source=file, output=output, overwrite=overwrite, schema=schema, columns=columns,
                           normal_form=normal_form, strip_html=strip_html, min_chars=min_chars, max_chars=max_chars,
                           min_tokens=min_tokens, max_tokens=max_tokens, model=model, max_repetition=max_repetition,
                           max_symbol_ratio=max_symbol_ratio, languages=languages,
                           min_language_confidence=min_language_confidence, dedup=dedup, near_dup=near_dup,
                           near_dup_threshold=near_dup_threshold, num_perm=num_perm, skip_bad_rows=skip_bad_rows))


@data_group.command("split")
@click.argument("file", type=_FILE)
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for train.jsonl, eval.jsonl, test.jsonl and split.report.{json,md}.")
@click.option("--eval", "eval_fraction", type=float, default=0.1, show_default=True, help="Fraction of rows for eval.")
@click.option("--test", "test_fraction", type=float, default=0.1, show_default=True, help="Fraction for test (0: none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random assignment.")
@click.option("--stratify", default=None, help="Field whose every value gets the split fractions (e.g. output).")
@click.option("--columns", callback=_columns, default=None, help="Text columns of a raw table, comma-separated.")
@_near_dup_options
@_common
def split_cmd(file: Path, output: Path, eval_fraction: float, test_fraction: float, seed: int, stratify: str | None,
              columns: tuple[str, ...], near_dup: bool, near_dup_threshold: float, num_perm: int, schema: str,
              overwrite: bool, skip_bad_rows: bool) -> None:
    """Split FILE into train/eval/test with no row or near duplicate shared between splits."""
    from edgeft.datatools.split import SplitConfig, split_file

    split_file(SplitConfig(source=file, output=output, eval_fraction=eval_fraction, test_fraction=test_fraction,
                           seed=seed, stratify=stratify, schema=schema, columns=columns, near_dup=near_dup,
                           near_dup_threshold=near_dup_threshold, num_perm=num_perm, overwrite=overwrite,
                           skip_bad_rows=skip_bad_rows))
