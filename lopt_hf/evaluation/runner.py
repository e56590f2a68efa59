"""``run_evaluation``: every (task, optimizer, seed) run, summarised into one JSON-serialisable dict."""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from .optimizers import OptimizerSpec, check_learned_optimizer, parse_optimizer_specs
from .tasks import RunRecord, resolve_tasks

logger = logging.getLogger(__name__)

# By default the learned optimizers that ship with lopt_hf against AdamW at 1e-3 and at its per-task best lr.
DEFAULT_OPTIMIZERS: tuple[str, ...] = ("lopt-hf/celo-adam-ns", "lopt-hf/celo-adam-mix", "lopt-hf/small-fc-lolo",
                                       "lopt-hf/celo2-base-mini", "adamw", "adamw-grid")
DEFAULT_STEPS = 200
DEFAULT_SEEDS: tuple[int, ...] = (0, 1)


def final_window(steps: int) -> int:
    """How many final steps the reported training loss averages: the last 10% (at least one)."""
    return max(1, steps // 10)


def run_evaluation(tasks: Sequence[str] | None = None, optimizers: Sequence[str] | None = None, *,
                   steps: int = DEFAULT_STEPS, seeds: Sequence[int] = DEFAULT_SEEDS,
                   progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Train every task with every optimizer for ``steps`` steps from every seed.

    Args:
        tasks: names from :data:`lopt_hf.evaluation.TASKS`; ``None`` runs
            :data:`~lopt_hf.evaluation.DEFAULT_TASKS`, skipping (with a logged message) those whose
            data is unavailable here. A named task whose data is unavailable raises
            ``DatasetUnavailableError``; an unknown name ``UnknownTaskError``.
        optimizers: specs (``adamw``, ``adamw:3e-3``, ``adamw-grid``, ``adam[:LR]``, ``sgdm[:LR]``, a
            learned-optimizer folder / Hub repo id, optionally ``LABEL=SPEC``); ``None`` runs
            :data:`DEFAULT_OPTIMIZERS`. Bad specs raise ``OptimizerSpecError`` before any training
            (learned optimizers are loaded once on a probe model to check them).
        steps: optimizer steps per run.
        seeds: one run per seed; a seed fixes the model's initialisation and its batches, the
            same for every optimizer.
        progress: show a tqdm bar (with ETA) over all runs.
        threads: torch intra-op threads while the runs train (restored afterwards); ``None`` leaves
            torch's setting. These models are tiny: 1 thread is the fastest, and on a busy machine
            more can be many times slower.

    Returns:
        A dict that ``json.dumps(..., allow_nan=False)`` accepts (non-finite numbers are ``None``)::

            {"settings": {"steps", "seeds", "tasks", "optimizers" {label: spec}, "skipped_tasks" {name: reason},
                          "final_train_loss_window", "torch_version", "transformers_version", "lopt_hf_version",
                          "torch_threads", "date", "total_seconds"},
             "tasks": {task: {"description",
                              "optimizers": {label: {"spec", "description", "mean_curve", "final_train_loss",
                                                     "test_loss", "test_accuracy", "seconds_per_run",
                                                     "diverged_runs", "errors", "runs": [run, ...],
                                                     # adamw-grid only:
                                                     "chosen_lr", "grid": {"0.001": {same keys but spec}, ...}}}}}}

        A run is ``{"seed", "train_loss" (one per step taken), "test_loss", "test_accuracy", "seconds",
        "diverged_at_step", "diverged_loss", "error"}``. A run stops at its first non-finite training
        loss (recorded as ``None`` in ``train_loss``, with ``diverged_at_step`` (1-based) and
        ``diverged_loss`` ("nan", "inf", "-inf")); a run that raises is recorded with ``error`` and the
        evaluation goes on. ``mean_curve`` is the per-step mean over seeds (``None`` where any seed
        has no finite loss); ``final_train_loss`` is the mean of its last 10% of steps;
        ``test_loss`` / ``test_accuracy`` are means over seeds (``None`` if any run lacks one).
        For ``adamw-grid`` the top-level numbers are those of ``chosen_lr``, the lr with the lowest
        ``final_train_loss`` (the smallest such lr on ties).
    """
    import transformers
    from tqdm.auto import tqdm

    from ..hub import lopt_hf_version

    steps = _check_steps(steps)
    seeds = _check_seeds(seeds)
    specs = parse_optimizer_specs(list(DEFAULT_OPTIMIZERS if optimizers is None else optimizers))
    task_list, skipped = resolve_tasks(None if tasks is None else list(tasks))
    for spec in specs:
        check_learned_optimizer(spec)

    # Seeds outermost and tasks innermost: cheap and expensive runs alternate, so the bar's average
    # rate (smoothing=0) gives an honest ETA early on.
    jobs = [(seed, spec, lr, factory, task) for seed in seeds for spec in specs
            for lr, factory in spec.candidates() for task in task_list]
    runs: dict[tuple[str, str, float | None], list[dict[str, Any]]] = {}
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    used_threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        with tqdm(total=len(jobs), desc="lopt-hf eval", unit="run", smoothing=0, dynamic_ncols=True,
                  disable=not progress) as bar:
            for seed, spec, lr, factory, task in jobs:
                lr_note = f" lr {lr:g}" if spec.is_grid else ""
                bar.set_postfix_str(f"{task.name} | {spec.label}{lr_note} | seed {seed}", refresh=True)
                runs.setdefault((task.name, spec.label, lr), []).append(_run_one(task, factory, steps, seed))
                bar.update(1)
    finally:
        torch.set_num_threads(previous_threads)
    total_seconds = time.perf_counter() - started

    window = final_window(steps)
    results: dict[str, Any] = {
        "settings": {
            "steps": steps, "seeds": seeds, "tasks": [task.name for task in task_list],
            "optimizers": {spec.label: spec.spec for spec in specs}, "skipped_tasks": skipped,
            "final_train_loss_window": window, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "lopt_hf_version": lopt_hf_version(),
            "torch_threads": used_threads,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "total_seconds": round(total_seconds, 2),
        },
        "tasks": {},
    }
    for task in task_list:
        entries = {spec.label: _optimizer_entry(spec, task.name, runs, steps, window) for spec in specs}
        results["tasks"][task.name] = {"description": task.description, "optimizers": entries}
    return results


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(steps)


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if any(isinstance(seed, bool) or int(seed) != seed for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, got {seeds!r}")
    return [int(seed) for seed in seeds]


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _run_one(task: Any, factory: Any, steps: int, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        record: RunRecord = task.run(factory, steps=steps, seed=seed)
    except Exception as error:  # one failing run (e.g. an optimizer raising on a blow-up) must not end the rest
        logger.warning("run %s seed %d failed: %s: %s", task.name, seed, type(error).__name__, error)
        return {"seed": seed, "train_loss": [], "test_loss": None, "test_accuracy": None,
                "seconds": round(time.perf_counter() - start, 3), "diverged_at_step": None, "diverged_loss": None,
                "error": f"{type(error).__name__}: {error}"}
    diverged = record.diverged_at_step
    test_loss = _finite(record.test_loss)
    # The argmax of non-finite logits is arbitrary: no accuracy without a finite test loss.
    accuracy = None if test_loss is None else _finite(record.test_accuracy)
    return {"seed": seed, "train_loss": [_finite(loss) for loss in record.train_losses],
            "test_loss": test_loss, "test_accuracy": accuracy,
            "seconds": round(record.seconds, 3), "diverged_at_step": diverged,
            "diverged_loss": None if diverged is None else str(record.train_losses[diverged - 1]), "error": None}


def _mean(values: Sequence[float | None]) -> float | None:
    if not values or any(value is None for value in values):
        return None
    return sum(values) / len(values)  # type: ignore[arg-type]


def summarise_runs(runs: Sequence[dict[str, Any]], steps: int, window: int) -> dict[str, Any]:
    """Mean curve and mean final metrics over the seeds' runs (see :func:`run_evaluation`)."""
    curves = [run["train_loss"] for run in runs]
    mean_curve = [_mean([curve[index] if index < len(curve) else None for curve in curves]) for index in range(steps)]
    return {
        "mean_curve": mean_curve,
        "final_train_loss": _mean(mean_curve[-window:]),
        "test_loss": _mean([run["test_loss"] for run in runs]),
        "test_accuracy": _mean([run["test_accuracy"] for run in runs]),
        "seconds_per_run": round(sum(run["seconds"] for run in runs) / len(runs), 3),
        "diverged_runs": sum(run["diverged_at_step"] is not None for run in runs),
        "errors": sum(run["error"] is not None for run in runs),
        "runs": list(runs),
    }


def _optimizer_entry(spec: OptimizerSpec, task: str, runs: dict, steps: int, window: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"spec": spec.spec, "description": spec.description}
    summaries = {lr: summarise_runs(runs[(task, spec.label, lr)], steps, window) for lr, _ in spec.candidates()}
    if not spec.is_grid:
        (summary,) = summaries.values()
        return {**entry, **summary}

    def rank(lr: float) -> float:
        final = summaries[lr]["final_train_loss"]
        return math.inf if final is None else final

    chosen = min(summaries, key=rank)  # min keeps the first (smallest lr) on ties
    return {**entry, **summaries[chosen], "chosen_lr": chosen,
            "grid": {f"{lr:g}": summary for lr, summary in summaries.items()}}
