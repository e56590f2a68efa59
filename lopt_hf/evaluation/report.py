"""Reports of :func:`lopt_hf.evaluation.run_evaluation` results: a markdown table, a plot, a JSON file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..plotting import smooth  # re-exported: lopt_hf.evaluation.smooth

_COLUMNS = (("final_train_loss", "train loss", min), ("test_loss", "test loss", min),
            ("test_accuracy", "test acc", max))


def _format(value: float) -> str:
    return f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def _optimizer_name(label: str, entry: dict[str, Any]) -> str:
    if entry.get("chosen_lr") is not None:
        return f"{label} (lr {entry['chosen_lr']:g})"
    return label


def _missing(entry: dict[str, Any]) -> str:
    """What to show for a metric that has no finite value."""
    runs = len(entry.get("runs", [])) or 1
    if entry.get("errors"):
        return f"error ({entry['errors']}/{runs} seeds)"
    if entry.get("diverged_runs"):
        return f"diverged ({entry['diverged_runs']}/{runs} seeds)"
    return "—"


def markdown_table(results: dict[str, Any]) -> str:
    """One row per (task, optimizer): final training loss, test loss, test accuracy; best per task in bold.

    The training loss is the mean over the last 10% of steps of the seed-averaged curve; all numbers
    are means over seeds. For ``adamw-grid`` the chosen lr is shown. Runs that diverged or failed
    show as such instead of a number. A note under the table states steps and seeds.
    """
    settings = results.get("settings", {})
    lines = ["| task | optimizer | train loss | test loss | test acc |", "|---|---|---:|---:|---:|"]
    for task, task_results in results.get("tasks", {}).items():
        entries = task_results["optimizers"]
        shown = {label: {key: (None if entry.get(key) is None else _format(entry[key])) for key, _, _ in _COLUMNS}
                 for label, entry in entries.items()}
        best = {}
        for key, _, pick in _COLUMNS:
            # Compare what is shown, so values that print the same are all bold.
            candidates = [float(cells[key]) for cells in shown.values() if cells[key] is not None]
            best[key] = _format(pick(candidates)) if len(candidates) > 1 else None
        for label, entry in entries.items():
            cells = []
            for key, _, _ in _COLUMNS:
                text = shown[label][key]
                if text is None:
                    cells.append(_missing(entry))
                else:
                    cells.append(f"**{text}**" if text == best[key] else text)
            lines.append(f"| {task} | {_optimizer_name(label, entry)} | " + " | ".join(cells) + " |")
    steps = settings.get("steps")
    seeds = settings.get("seeds")
    if steps is not None:
        window = settings.get("final_train_loss_window", max(1, steps // 10))
        lines += ["", f"{steps} steps, mean over seeds {seeds}; train loss = mean over the last {window} steps; "
                      "test = held-out data after the last step; **bold** = best per task."
                      + (" adamw-grid: the lr with the lowest train loss per task." if any(
                          "chosen_lr" in entry for task_results in results.get("tasks", {}).values()
                          for entry in task_results["optimizers"].values()) else "")]
    return "\n".join(lines) + "\n"


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of several ``run_evaluation`` results of the same length and seeds (say the baselines from
    one run, a candidate from another): the union of their tasks and optimizers, in the order given.

    A (task, optimizer label) present in two reports must be the same spec (the first report's entry is kept);
    lengths or seeds that differ are an error (a mean over other seeds or another horizon is another number).
    """
    if not reports:
        raise ValueError("no reports to merge")
    first = reports[0]["settings"]
    merged = {"settings": {**first, "tasks": [], "optimizers": {}, "skipped_tasks": {}}, "tasks": {}}
    for report in reports:
        settings = report["settings"]
        for key in ("steps", "seeds"):
            if settings[key] != first[key]:
                raise ValueError(f"reports differ in {key}: {first[key]} and {settings[key]}")
        for label, spec in settings["optimizers"].items():
            merged["settings"]["optimizers"].setdefault(label, spec)
        merged["settings"]["skipped_tasks"].update(settings.get("skipped_tasks", {}))
        for task, task_results in report["tasks"].items():
            target = merged["tasks"].setdefault(task, {**task_results, "optimizers": {}})
            for label, entry in task_results["optimizers"].items():
                earlier = target["optimizers"].setdefault(label, entry)
                if earlier.get("spec") != entry.get("spec"):
                    raise ValueError(f"{task}: optimizer label {label!r} is {earlier.get('spec')!r} in one report and "
                                     f"{entry.get('spec')!r} in another")
            if task not in merged["settings"]["tasks"]:
                merged["settings"]["tasks"].append(task)
    return merged


def compact_results(results: dict[str, Any], significant_digits: int = 4) -> dict[str, Any]:
    """A copy of ``results`` small enough to keep in a repository: per-seed curves dropped (each run keeps
    its final numbers), mean curves rounded to ``significant_digits``. Tables and plots render the same."""
    import copy

    def shrink(entry: dict[str, Any]) -> None:
        entry["mean_curve"] = [None if value is None else float(f"{value:.{significant_digits}g}")
                               for value in entry.get("mean_curve", [])]
        for run in entry.get("runs", []):
            run.pop("train_loss", None)
        for grid_entry in entry.get("grid", {}).values():
            shrink(grid_entry)

    compact = copy.deepcopy(results)
    for task_results in compact.get("tasks", {}).values():
        for entry in task_results["optimizers"].values():
            shrink(entry)
    compact.setdefault("settings", {})["compacted"] = f"per-seed curves dropped, mean curves to {significant_digits} digits"
    return compact


def plot_curves(results: dict[str, Any], path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """One subplot per task: seed-averaged training loss vs step (log y) for every optimizer.

    Runs longer than 300 steps are drawn as a moving average over 1% of the steps (minibatch noise
    would otherwise hide the differences); the title says so.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    tasks = results.get("tasks", {})
    count = max(1, len(tasks))
    columns = min(3, count)
    rows = (count + columns - 1) // columns
    figure = Figure(figsize=(4.6 * columns, 3.5 * rows))
    labels = list(results.get("settings", {}).get("optimizers", {})) or sorted(
        {label for task in tasks.values() for label in task["optimizers"]})
    colors = {label: f"C{index % 10}" for index, label in enumerate(labels)}
    # Optimizers that behave alike (adam / adamw at the same lr) draw on top of each other: vary the dashes.
    styles = {label: ("-", "--", "-.", ":")[index % 4] for index, label in enumerate(labels)}
    steps = int(results.get("settings", {}).get("steps") or 0)
    window = steps // 100 if steps > 300 else 1
    for index, (task, task_results) in enumerate(tasks.items()):
        axis = figure.add_subplot(rows, columns, index + 1)
        plotted = False
        for label, entry in task_results["optimizers"].items():
            curve = [float("nan") if value is None else value for value in entry.get("mean_curve", [])]
            curve = smooth(curve, window)
            if not any(value == value and value > 0 for value in curve):
                continue  # nothing finite and positive to draw on a log axis
            axis.plot(range(1, len(curve) + 1), curve, linewidth=1.2, color=colors.get(label),
                      linestyle=styles.get(label, "-"),
                      label=_optimizer_name(label, entry))
            plotted = True
        axis.set(title=task, xlabel="step", ylabel="training loss")
        if plotted:
            axis.set_yscale("log")
            axis.legend(loc="best", fontsize="x-small")
        axis.grid(alpha=0.3, which="both")
    settings = results.get("settings", {})
    if "seeds" in settings:
        figure.suptitle(f"training loss, mean over seeds {settings['seeds']}"
                        + (f", moving average over {window} steps" if window > 1 else ""), fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=dpi)
    return path


def write_report(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``results.json``, ``curves.png`` and ``results.md`` (table, settings, plot) into ``out_dir``.

    Returns their paths under the keys ``"json"``, ``"plot"``, ``"markdown"``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    plot_path = plot_curves(results, out / "curves.png")
    settings = results.get("settings", {})
    lines = ["# Optimizer evaluation", "", markdown_table(results).rstrip("\n"), "", "## Tasks", ""]
    lines += [f"- `{task}`: {task_results['description']}" for task, task_results in results.get("tasks", {}).items()]
    for task, reason in settings.get("skipped_tasks", {}).items():
        lines.append(f"- `{task}`: skipped — {reason}")
    lines += ["", "## Optimizers", ""]
    first_task = next(iter(results.get("tasks", {}).values()), {"optimizers": {}})
    for label, spec in settings.get("optimizers", {}).items():
        description = first_task["optimizers"].get(label, {}).get("description", "")
        lines.append(f"- {label}: `{spec}`" + (f" — {description}" if description else ""))
    lines += ["", f"![training curves]({plot_path.name})", ""]
    if settings:
        lines.append(f"torch {settings.get('torch_version')}, transformers {settings.get('transformers_version')}, "
                     f"lopt_hf {settings.get('lopt_hf_version')}, torch threads: {settings.get('torch_threads')}, "
                     f"{settings.get('date')}; total {settings.get('total_seconds')} s.")
    markdown_path = out / "results.md"
    markdown_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"json": json_path, "plot": plot_path, "markdown": markdown_path}
