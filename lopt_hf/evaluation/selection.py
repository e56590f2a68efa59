"""Choosing a checkpoint of a meta-training run on validation tasks, never on the held-out ones.

A run's checkpoints differ a lot from one to the next on a language model (issue 15: the held-out GPT-2
at 200 steps went 2.20 … 2.66 over nine checkpoints of one run), so "the last one" is a lottery and
"the best on ``--suite heldout``" is tuning on the test set. :func:`rank_checkpoints` scores each
candidate of a ``lopt-hf eval --suite validation`` report (tasks of the meta-training families, new
seeds) by the geometric mean over tasks of its final training loss divided by a baseline's (AdamW at
lr 1e-3, run in the same report): below 1 beats the baseline, and no single task's scale dominates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CheckpointScore", "rank_checkpoints", "ranking_markdown"]


@dataclass(frozen=True)
class CheckpointScore:
    """One candidate's validation losses and its score (lower is better)."""

    label: str
    losses: dict[str, float]  # task -> final train loss
    ratios: dict[str, float]  # task -> loss / the baseline's

    @property
    def score(self) -> float:
        """Geometric mean of :attr:`ratios` (inf when a run diverged)."""
        if any(not math.isfinite(ratio) or ratio <= 0 for ratio in self.ratios.values()):
            return math.inf
        return math.exp(sum(math.log(ratio) for ratio in self.ratios.values()) / len(self.ratios))


def rank_checkpoints(results: Mapping[str, Any], candidates: list[str],
                     baseline: str = "adamw:1e-3") -> list[CheckpointScore]:
    """The ``candidates`` (optimizer labels of one ``run_evaluation`` result) best first.

    Every task of the report must have the baseline and every candidate; a diverged run (no final
    loss) scores ``inf``.
    """
    if not candidates:
        raise ValueError("no candidates to rank")
    scores = []
    for label in candidates:
        losses, ratios = {}, {}
        for task, task_results in results["tasks"].items():
            entries = task_results["optimizers"]
            for needed in (baseline, label):
                if needed not in entries:
                    raise ValueError(f"{task} has no result for {needed!r}")
            reference = entries[baseline].get("final_train_loss")
            if reference is None or not reference > 0:
                raise ValueError(f"the baseline {baseline} has no positive final loss on {task}: {reference!r}")
            loss = entries[label].get("final_train_loss")
            losses[task] = math.inf if loss is None else float(loss)
            ratios[task] = losses[task] / float(reference)
        scores.append(CheckpointScore(label, losses, ratios))
    return sorted(scores, key=lambda entry: entry.score)


def ranking_markdown(scores: list[CheckpointScore], baseline: str = "adamw:1e-3") -> str:
    """A markdown table: candidates best first, loss (÷ baseline) per task, the score."""
    tasks = list(scores[0].losses)
    lines = ["| candidate | " + " | ".join(tasks) + f" | score (geometric mean of loss ÷ {baseline}) |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for entry in scores:
        cells = [f"{entry.losses[task]:.4g} ({entry.ratios[task]:.3f})" for task in tasks]
        lines.append(f"| {entry.label} | " + " | ".join(cells) + f" | {entry.score:.4f} |")
    return "\n".join(lines)
