"""The bar a learned optimizer must clear before lopt_hf ships it as a default (issue 15, "Ship it").

Read from ``lopt-hf eval`` reports (``results.json``; several runs may be combined, e.g. a candidate
evaluated after the baselines, as long as they ran the same steps and seeds), per task and run length:

1. the candidate's final training loss is below AdamW at lr 1e-3 on **every** task and length;
2. it is within 5% of per-task tuned AdamW (``adamw-grid``: the best lr of the grid for that task and
   length) on at least two thirds of them;
3. its average normalised loss — loss divided by tuned AdamW's, so 1 is tuned AdamW and lower is
   better — is below the reference learned optimizer's (published Celo-Adam), both as the arithmetic
   mean and as the geometric mean (losses that reach 1e-5 make single ratios swing; the geometric
   mean weighs a halving and a doubling alike).

Training loss is what the learned optimizers are meta-trained to lower; held-out loss is reported
beside it by ``lopt-hf eval`` and is not part of the bar.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["BarRow", "BarVerdict", "check_bar", "merge_results", "verdict_markdown", "ADAMW", "TUNED"]

ADAMW = "adamw:1e-3"
TUNED = "adamw-grid"
WITHIN = 0.05  # "within 5% of tuned AdamW"
SHARE = 2 / 3  # ... on at least this share of the task × length cells


@dataclasses.dataclass(frozen=True)
class BarRow:
    """One task at one run length."""

    task: str
    steps: int
    candidate: float
    reference: float
    adamw: float
    tuned: float

    @property
    def beats_adamw(self) -> bool:
        return self.candidate < self.adamw

    @property
    def near_tuned(self) -> bool:
        return self.candidate <= (1 + WITHIN) * self.tuned

    @property
    def normalised(self) -> float:
        return self.candidate / self.tuned

    @property
    def reference_normalised(self) -> float:
        return self.reference / self.tuned


@dataclasses.dataclass(frozen=True)
class BarVerdict:
    """The three conditions and the rows they were read from."""

    candidate: str
    reference: str
    rows: tuple[BarRow, ...]

    @property
    def beats_adamw_count(self) -> int:
        return sum(row.beats_adamw for row in self.rows)

    @property
    def near_tuned_count(self) -> int:
        return sum(row.near_tuned for row in self.rows)

    @property
    def beats_adamw_everywhere(self) -> bool:
        return self.beats_adamw_count == len(self.rows)

    @property
    def near_tuned_share(self) -> float:
        return self.near_tuned_count / len(self.rows)

    @property
    def near_tuned_enough(self) -> bool:
        return self.near_tuned_share >= SHARE - 1e-9  # 4 of 6 is exactly 2/3

    def mean_normalised(self, of_reference: bool = False) -> tuple[float, float]:
        """(arithmetic mean, geometric mean) of the normalised losses."""
        values = [row.reference_normalised if of_reference else row.normalised for row in self.rows]
        return sum(values) / len(values), math.exp(sum(math.log(value) for value in values) / len(values))

    @property
    def beats_reference(self) -> bool:
        return all(own < other for own, other in zip(self.mean_normalised(), self.mean_normalised(True)))

    @property
    def passed(self) -> bool:
        return self.beats_adamw_everywhere and self.near_tuned_enough and self.beats_reference


def merge_results(reports: Iterable[dict[str, Any]]) -> dict[int, dict[str, dict[str, float]]]:
    """``{steps: {task: {optimizer label: final train loss}}}`` from ``lopt-hf eval`` results.

    Reports of the same length must share their seeds (a mean over other seeds is another number); the
    ``adamw-grid`` entry is the best lr's loss. A label evaluated twice for the same cell must agree.
    """
    merged: dict[int, dict[str, dict[str, float]]] = {}
    seeds: dict[int, list[int]] = {}
    for report in reports:
        settings = report["settings"]
        steps = int(settings["steps"])
        if seeds.setdefault(steps, list(settings["seeds"])) != list(settings["seeds"]):
            raise ValueError(f"reports of {steps} steps ran different seeds: {seeds[steps]} and {settings['seeds']}")
        for task, task_results in report["tasks"].items():
            cell = merged.setdefault(steps, {}).setdefault(task, {})
            for label, entry in task_results["optimizers"].items():
                loss = entry.get("final_train_loss")
                if loss is None:
                    continue
                if label in cell and not math.isclose(cell[label], float(loss), rel_tol=1e-9):
                    raise ValueError(f"{label} on {task} at {steps} steps differs between reports")
                cell[label] = float(loss)
    return merged


def check_bar(reports: Sequence[dict[str, Any]], candidate: str, reference: str = "celo-adam",
              tasks: Sequence[str] | None = None) -> BarVerdict:
    """The verdict for ``candidate`` (an optimizer label of the reports) against AdamW and ``reference``.

    Every task × length that any report holds (of ``tasks`` only, when given: say the held-out three of a
    report over all eight) must have the candidate, the reference, ``adamw:1e-3`` and ``adamw-grid``; a
    missing one is an error naming it (a bar with holes proves nothing).
    """
    rows = []
    for steps, cells in sorted(merge_results(reports).items()):
        for task, losses in cells.items():
            if tasks is not None and task not in tasks:
                continue
            missing = [label for label in (candidate, reference, ADAMW, TUNED) if label not in losses]
            if missing:
                raise ValueError(f"{task} at {steps} steps has no result for {missing}")
            rows.append(BarRow(task, steps, losses[candidate], losses[reference], losses[ADAMW], losses[TUNED]))
    if not rows:
        raise ValueError("no results to check" + (f" for the tasks {list(tasks)}" if tasks is not None else ""))
    return BarVerdict(candidate, reference, tuple(rows))


def load_reports(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """``results.json`` files (or folders holding one) of ``lopt-hf eval``."""
    reports = []
    for path in paths:
        file = os.path.join(path, "results.json") if os.path.isdir(path) else os.fspath(path)
        with open(file, encoding="utf-8") as handle:
            reports.append(json.load(handle))
    return reports


def verdict_markdown(verdict: BarVerdict) -> str:
    """The verdict as a markdown table and three lines, one per condition."""
    lines = [f"| task | steps | {verdict.candidate} | {verdict.reference} | AdamW 1e-3 | tuned AdamW | "
             f"normalised ({verdict.candidate} / {verdict.reference}) | beats AdamW 1e-3 | within 5% of tuned |",
             "|---|---:|---:|---:|---:|---:|---:|:-:|:-:|"]
    for row in verdict.rows:
        lines.append(f"| {row.task} | {row.steps} | {row.candidate:.4g} | {row.reference:.4g} | {row.adamw:.4g} | "
                     f"{row.tuned:.4g} | {row.normalised:.3f} / {row.reference_normalised:.3f} | "
                     f"{'yes' if row.beats_adamw else 'no'} | {'yes' if row.near_tuned else 'no'} |")
    own, other = verdict.mean_normalised(), verdict.mean_normalised(True)
    lines += ["",
              f"1. beats AdamW 1e-3 on every task and length: {'yes' if verdict.beats_adamw_everywhere else 'no'} "
              f"({verdict.beats_adamw_count} of {len(verdict.rows)})",
              f"2. within 5% of tuned AdamW on ≥ 2/3: {'yes' if verdict.near_tuned_enough else 'no'} "
              f"({verdict.near_tuned_count} of {len(verdict.rows)})",
              f"3. average normalised loss below {verdict.reference}'s: {'yes' if verdict.beats_reference else 'no'} "
              f"(arithmetic {own[0]:.3f} vs {other[0]:.3f}, geometric {own[1]:.3f} vs {other[1]:.3f})",
              "",
              f"**{'Meets' if verdict.passed else 'Does not meet'} the bar.**"]
    return "\n".join(lines)


def comparison_markdown(verdicts: Sequence[BarVerdict]) -> str:
    """Several candidates side by side on the same cells (an ablation table): each cell's loss and, in
    brackets, loss ÷ tuned AdamW; then each candidate's three conditions and verdict."""
    first = verdicts[0]
    cells = [(row.task, row.steps) for row in first.rows]
    for verdict in verdicts[1:]:
        if [(row.task, row.steps) for row in verdict.rows] != cells:
            raise ValueError(f"{verdict.candidate} was checked on other cells than {first.candidate}")
    names = [verdict.candidate for verdict in verdicts]
    lines = [f"| task | steps | AdamW 1e-3 | tuned AdamW | {' | '.join(names)} |",
             "|---|---:|---:|---:|" + "---:|" * len(names)]
    for index, (task, steps) in enumerate(cells):
        base = first.rows[index]
        values = [f"{verdict.rows[index].candidate:.3g} ({verdict.rows[index].normalised:.2f})" for verdict in verdicts]
        lines.append(f"| {task} | {steps} | {base.adamw:.3g} | {base.tuned:.3g} | {' | '.join(values)} |")
    count = len(cells)

    def summary(label: str, values: list[str]) -> str:
        return f"| **{label}** | | | | {' | '.join(values)} |"

    lines += [summary("beats AdamW 1e-3", [f"{v.beats_adamw_count} of {count}" for v in verdicts]),
              summary("within 5% of tuned", [f"{v.near_tuned_count} of {count}" for v in verdicts]),
              summary("mean normalised (arith. / geom.)",
                      ["{:.3f} / {:.3f}".format(*v.mean_normalised()) for v in verdicts]),
              summary(f"meets the bar (reference {first.reference})",
                      ["yes" if v.passed else "no" for v in verdicts])]
    return "\n".join(lines)
