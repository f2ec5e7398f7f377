"""Multi-task training data (``--task-weights``): the checks that every row names its task and every
weighted task has rows, and each epoch's draw of rows in which every task fills its weighted share.

Semantics: an epoch keeps its length N (the training rows). Task t, with n_t rows and weight w_t
(1 when unnamed), fills c_t = N x n_t w_t / sum_s(n_s w_s) of it (rounded by largest remainder, so
the c_t add up to N). Its rows are drawn without replacement, in whole shuffled passes while c_t
exceeds n_t, so within an epoch every row of t is seen floor or ceil of c_t / n_t times; the drawn
rows are then shuffled together. A row of a task with weight 2 is therefore seen twice as often as
a row of a task with weight 1, whatever the tasks' sizes. Every draw is a function of the
generator it is given (seeded by the run's seed and the epoch).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from edgeft.core.errors import DataError
from edgeft.core.rows import Row
from edgeft.data import Tokenized


def check_task_rows(rows: list[Row], weights: dict[str, float], data: str) -> None:
    """Every row names a task and every task in ``--task-weights`` has rows (else a one-line DataError)."""
    missing = next((row for row in rows if row.task is None), None)
    if missing is not None:
        raise DataError(f"{data}:{missing.line}: missing field 'task' (--task-weights needs a task on every row)")
    present = {row.task for row in rows}
    absent = [task for task in weights if task not in present]
    if absent:
        raise DataError(f"--task-weights names task(s) {', '.join(absent)} with no rows in {data} "
                        f"(tasks there: {', '.join(sorted(present))})")


def epoch_counts(sizes: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    """Rows each task fills in an epoch of ``sum(sizes)`` rows: proportional to rows x weight,
    rounded by largest remainder (ties to the task named first in sorted order)."""
    total = sum(sizes.values())
    mass = {task: n * weights[task] for task, n in sizes.items()}
    exact = {task: total * m / sum(mass.values()) for task, m in mass.items()}
    counts = {task: int(x) for task, x in exact.items()}
    by_remainder = sorted(exact, key=lambda task: (-(exact[task] - counts[task]), task))
    for task in by_remainder[: total - sum(counts.values())]:
        counts[task] += 1
    return counts


class TaskMix:
    """Each epoch's weighted draw of unit indices, grouped by the task of each unit."""

    def __init__(self, unit_tasks: list[str], weights: dict[str, float]):
        self.groups: dict[str, list[int]] = {}
        for i, task in enumerate(unit_tasks):
            self.groups.setdefault(task, []).append(i)
        self.weights = {task: weights.get(task, 1.0) for task in sorted(self.groups)}
        self.counts = epoch_counts({t: len(g) for t, g in self.groups.items()}, self.weights)

    @classmethod
    def for_examples(cls, examples: list[Tokenized], weights: dict[str, float], data: str) -> TaskMix:
        """The mix of the training rows (a weighted task left without any: DataError)."""
        present = {ex.task for ex in examples}
        gone = [task for task in weights if task not in present]
        if gone:
            raise DataError(f"--task-weights: task(s) {', '.join(gone)} of {data} have no training rows left "
                            "(all held out by --eval-split or without response tokens)")
        return cls([ex.task for ex in examples], weights)

    def draw(self, generator: Any) -> list[int]:
        """One epoch's unit indices (length = number of units), shuffled, from a torch generator."""
        import torch

        picks: list[int] = []
        for task in sorted(self.groups):
            rows, count = self.groups[task], self.counts[task]
            while count > 0:
                order = torch.randperm(len(rows), generator=generator).tolist()
                picks += [rows[i] for i in order[:count]]
                count -= len(rows)
        return [picks[i] for i in torch.randperm(len(picks), generator=generator).tolist()]

    def summary(self) -> dict[str, Any]:
        """What the run record keeps: per task its rows, weight and rows drawn per epoch."""
        return {task: {"rows": len(self.groups[task]), "weight": self.weights[task],
                       "rows_per_epoch": self.counts[task]} for task in self.weights}


def task_record(examples: list[Tokenized], mix: TaskMix | None) -> dict[str, Any] | None:
    """The run record's ``tasks``: the mix's summary, or the training rows per task when the rows
    carry tasks but no weights were given (None when no row has a task)."""
    if mix is not None:
        return {"weighted": True, "tasks": mix.summary()}
    counts = Counter(ex.task for ex in examples if ex.task is not None)
    if not counts:
        return None
    return {"weighted": False, "tasks": {task: {"rows": n} for task, n in sorted(counts.items())}}
