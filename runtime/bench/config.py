"""What ``edgeft bench`` is asked to do: ``BenchConfig``, its validation, its defaults, and the
``--strict`` failure (``ThresholdsNotMet``, exit status 4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeft.core.errors import ConfigError, EdgeftError
from runtime import latency as L
from runtime.thresholds import ACCURACY_DROP_MAX

ANSWER_TOKENS = 16  # greedy answer length for task accuracy (stops earlier at end of turn)
MAX_ROWS = 64
STRICT_EXIT_CODE = 4


class ThresholdsNotMet(EdgeftError):
    """``--strict``: at least one artifact fell below its accuracy bars."""

    exit_code = STRICT_EXIT_CODE


@dataclass
class BenchConfig:
    """Everything ``edgeft bench`` needs; ``validate`` checks it before any file is read."""

    reference: Path  # adapter directory (unmerged) or merged model directory
    artifacts: list[Path]  # merged directories, ONNX export directories, .gguf files
    data: Path  # evaluation file (instruction / chat / prompt-completion rows)
    output: Path  # directory for report.json, report.md and the plots
    threads: int | None = None  # intra-op threads for every engine (default: physical cores)
    max_rows: int | None = MAX_ROWS  # first N evaluation rows (None: all)
    prompt_tokens: int = L.PROMPT_TOKENS  # latency workload prompt length
    new_tokens: int = L.NEW_TOKENS  # latency workload generated tokens (EOS ignored)
    warmup: int = L.WARMUP  # discarded runs before timing
    repeats: int = L.REPEATS  # timed runs; median and spread are reported
    answer_tokens: int = ANSWER_TOKENS  # greedy answer length for task accuracy
    allow_unverified: bool = False  # benchmark artifacts whose verification record is missing or failed
    top1_overrides: dict[str, float] = field(default_factory=dict)  # class ("all", "4-bit", ...) -> top-1 bar
    max_accuracy_drop: float = ACCURACY_DROP_MAX  # task accuracy may fall this far below the reference's
    strict: bool = False  # raise ThresholdsNotMet (exit 4) when an artifact is flagged
    overwrite: bool = False  # write into a non-empty --output
    keep_work: bool = False  # keep --output/.work (worker specs, results, reference logits)

    def validate(self) -> None:
        """Every out-of-range option in one ``ConfigError``."""
        problems = []
        for name, value, low in (("--prompt-tokens", self.prompt_tokens, 1), ("--new-tokens", self.new_tokens, 2),
                                 ("--warmup", self.warmup, 0), ("--repeats", self.repeats, 1),
                                 ("--answer-tokens", self.answer_tokens, 1)):
            if value < low:
                problems.append(f"{name} {value}: must be at least {low}")
        if self.max_rows is not None and self.max_rows < 1:
            problems.append(f"--max-rows {self.max_rows}: must be at least 1")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads {self.threads}: must be at least 1")
        if not self.artifacts:
            problems.append("--artifact: give at least one artifact to compare with the reference")
        if problems:
            raise ConfigError("; ".join(problems))
