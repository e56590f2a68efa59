"""The evaluation an exported artifact's model card shows, run with ``lopt_hf.evaluation`` (``lopt-hf eval``).

A meta-training config's ``evaluation:`` section names harness tasks; :func:`check_evaluation_tasks`
checks those names (meta-training itself does not know the harness) and :func:`evaluate_for_card`
runs them for the card.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..evaluation import DEFAULT_STEPS, markdown_table, plot_curves, run_evaluation
from ..evaluation.tasks import UnknownTaskError, get_task
from ..hub import LearnedOptimizerModel, create_artifact
from ..metatrain.config import ConfigError, MetaTrainConfig
from ..metatrain.trainer import initial_theta

__all__ = ["evaluate_for_card", "check_evaluation_tasks", "RANDOM_INIT_LABEL"]


def check_evaluation_tasks(config: MetaTrainConfig, *, source: str = "config") -> None:
    """Raise :class:`ConfigError` naming the key when ``evaluation.tasks`` names a task the harness lacks."""
    for name in config.evaluation.tasks:
        try:
            get_task(name)
        except UnknownTaskError as err:
            raise ConfigError(f"{source}: evaluation.tasks: {err}") from None


RANDOM_INIT_LABEL = "random init θ₀"


def evaluate_for_card(artifact: LearnedOptimizerModel, config: MetaTrainConfig, *, steps: int | None = None,
                      plot_path: str | os.PathLike[str] | None = None, progress: bool = False,
                      threads: int | None = 1) -> dict[str, Any]:
    """Run the config's evaluation with ``lopt_hf.evaluation`` (what ``lopt-hf eval`` runs) for the card.

    The artifact, the same rule with the meta-parameters meta-training started from
    (:data:`RANDOM_INIT_LABEL`, ``metatrain.trainer.initial_theta``) and AdamW at every lr of
    ``evaluation.adamw_lrs`` train every task of ``evaluation.tasks`` from every seed of
    ``evaluation.seeds`` for ``steps`` steps (default ``evaluation.steps``, or the harness's
    200 when that is 0). Returns the card's ``evaluation`` provenance entry: ``description``,
    ``table`` (:func:`lopt_hf.evaluation.markdown_table`), ``plot`` (the name of ``plot_path``,
    where :func:`lopt_hf.evaluation.plot_curves` saves the curves) and ``summary`` (settings and
    the table's numbers, no curves, so config.json stays small).
    """
    settings = config.evaluation
    steps = int(steps or settings.steps or DEFAULT_STEPS)
    name = (artifact.config.provenance or {}).get("name") or config.card.name or config.name
    # fine-tuning (rule.init_from) starts from an artifact's theta, not a random one
    initial_label = (f"start θ₀ ({config.rule.init_from.replace('=', '-')})" if config.rule.init_from
                     else RANDOM_INIT_LABEL)  # '=' would end the label of an evaluation spec
    with tempfile.TemporaryDirectory(prefix="lopt_hf_eval_") as tmp:
        learned, initial = Path(tmp) / "learned", Path(tmp) / "initial"
        artifact.save_pretrained(learned)
        create_artifact(config.rule.name, theta=initial_theta(config),
                        rule_config=config.rule.config).save_pretrained(initial)
        specs = [f"{name}={learned}", f"{initial_label}={initial}",
                 *(f"AdamW {lr:g}=adamw:{lr!r}" for lr in settings.adamw_lrs)]
        results = run_evaluation(settings.tasks, specs, steps=steps, seeds=settings.seeds, progress=progress,
                                 threads=threads)
    adamw = ", ".join(f"{lr:g}" for lr in settings.adamw_lrs)
    tasks = "; ".join(f"`{task}`: {entry['description']}" for task, entry in results["tasks"].items())
    evaluation: dict[str, Any] = {
        "description": (
            f"Evaluated with the `lopt-hf eval` harness (`lopt_hf.evaluation`): {steps} steps per run, seeds "
            f"{list(settings.seeds)}; every optimizer trains the same models from the same initialisations on "
            f"the same batches. "
            f"'{name}' is this artifact; '{initial_label}' is this rule with the meta-parameters "
            f"meta-training started from" + (f"; AdamW (weight decay 0.01) at lr {adamw}" if adamw else "")
            + f". Tasks: {tasks}."),
        "table": markdown_table(results),
        "summary": _evaluation_summary(results),
    }
    if plot_path is not None:
        plot_curves(results, plot_path)
        evaluation["plot"] = Path(plot_path).name
    return evaluation


def _evaluation_summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of the harness's table (no curves or per-run data), rounded, with the settings."""
    keep = ("final_train_loss", "test_loss", "test_accuracy", "chosen_lr", "diverged_runs", "errors")
    settings = results["settings"]
    return {
        "settings": {key: settings[key] for key in ("steps", "seeds", "tasks", "final_train_loss_window",
                                                     "lopt_hf_version", "torch_version", "date")},
        "tasks": {task: {label: {key: round(entry[key], 5) if isinstance(entry[key], float) else entry[key]
                                 for key in keep if key in entry}
                         for label, entry in task_results["optimizers"].items()}
                  for task, task_results in results["tasks"].items()},
    }
