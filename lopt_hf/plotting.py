"""Plotting helpers shared by meta-training, evaluation and publishing (matplotlib, imported lazily).

``smooth`` is the one moving average of every curve lopt_hf draws (evaluation plots, the
meta-loss curve, the fine-tuning example); ``plot_meta_loss`` draws a meta-training run's
meta-loss (the run folder's ``meta_loss.png`` and the exported artifact's card plot);
``plot_loss_and_step_cost`` draws optimizers training the same model side by side — loss per step
(raw faint, smoothed bold, held-out points) next to loss per second of wall-clock time, with each
optimizer's measured cost per step in the legend (``scripts/demo.py``, ``docs/demo_loss.png``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["smooth", "plot_meta_loss", "plot_loss_and_step_cost"]


def smooth(curve: list[float], window: int) -> list[float]:
    """Trailing moving average; after a NaN (a diverged run) the rest of the curve is NaN."""
    if window <= 1:
        return list(curve)
    out, running = [], 0.0
    for index, value in enumerate(curve):
        running += value
        if index >= window:
            running -= curve[index - window]
        out.append(running / min(index + 1, window))
    return out


def plot_meta_loss(history: Mapping[str, Sequence[float]], path: str | os.PathLike[str], *,
                   title: str = "meta-loss", dpi: int = 110, series_labels: Mapping[str, str] | None = None) -> Path:
    """Save the meta-loss curve (raw and a moving average) as a PNG; returns the path.

    ``series_labels`` names further series of ``history`` (a task mixture's per-family meta-losses) drawn
    as moving averages beside the total, so one can see which family improves.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    losses = [float(value) for value in history.get("meta_loss", [])]
    steps = list(history.get("step", range(1, len(losses) + 1)))[:len(losses)]
    figure = Figure(figsize=(6, 3.6))
    axis = figure.add_subplot()
    axis.plot(steps, losses, linewidth=0.8, alpha=0.45, label="per outer step")
    window = max(1, len(losses) // 20)
    if window > 1:
        axis.plot(steps, smooth(losses, window), linewidth=1.6, label=f"moving average ({window})")
    for key, label in (series_labels or {}).items():
        values = [float(value) for value in history.get(key, [])][:len(steps)]
        known = [(step, value) for step, value in zip(steps, values) if math.isfinite(value)]
        if known:
            axis.plot([step for step, _ in known], smooth([value for _, value in known], window), linewidth=1.0,
                      linestyle="--", label=label)
    axis.set(xlabel="outer step", ylabel="meta-loss", title=title)
    finite = [value for value in losses if math.isfinite(value)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return _save(figure, path, dpi)


def plot_loss_and_step_cost(runs: Mapping[str, Mapping[str, Sequence[float] | float]],
                            path: str | os.PathLike[str], *, title: str,
                            meta_losses: Sequence[float] | None = None, dpi: int = 110) -> Path:
    """Save a comparison of optimizers that trained the same model; returns the path.

    ``runs`` maps a label to one optimizer's run: ``train_loss`` (one value per step), ``elapsed_s``
    (wall-clock seconds since the start after each step), ``ms_per_step`` (measured cost of one training
    step: forward, backward and the optimizer's step) and optionally ``eval_steps`` / ``eval_loss``
    (held-out loss at those steps) and ``test_accuracy``. Left: training loss per step, raw (faint) and
    a moving average (bold), held-out loss as markers; right: the moving average against wall-clock
    time, so a cheaper step shows as a curve shifted left. The y axis is logarithmic when the smoothed
    losses span more than a factor of 20; it is fitted to the smoothed and held-out curves, so single
    raw batches near zero do not squash the plot. ``meta_losses`` adds a meta-training panel first.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    panels = 3 if meta_losses else 2
    figure = Figure(figsize=(5 * panels, 4.8))
    axes = figure.subplots(1, panels, squeeze=True)
    if meta_losses:
        losses = [float(value) for value in meta_losses]
        window = max(1, len(losses) // 20)
        axes[0].plot(losses, linewidth=0.8, alpha=0.35, color="gray")
        axes[0].plot(smooth(losses, window), linewidth=1.6, color="black")
        axes[0].set(xlabel="outer step", ylabel="meta-loss", title="meta-training")
        axes[0].grid(alpha=0.3)
    by_step, by_time = axes[-2], axes[-1]
    shown: list[float] = []
    window = max(1, max((len(run["train_loss"]) for run in runs.values()), default=0) // 20)  # type: ignore[arg-type]
    for index, (label, run) in enumerate(runs.items()):
        color = f"C{index}"
        losses = [float(value) for value in run["train_loss"]]  # type: ignore[union-attr]
        steps = list(range(1, len(losses) + 1))
        smoothed = smooth(losses, window)
        shown += smoothed
        legend = f"{label}: {float(run['ms_per_step']):.2f} ms/step"  # type: ignore[arg-type]
        if run.get("test_accuracy") is not None:
            legend += f", test acc {float(run['test_accuracy']):.3f}"  # type: ignore[arg-type]
        by_step.plot(steps, losses, color=color, linewidth=0.6, alpha=0.22)
        by_step.plot(steps, smoothed, color=color, linewidth=1.8, label=legend)
        eval_steps, eval_loss = run.get("eval_steps"), run.get("eval_loss")
        if eval_steps and eval_loss:
            shown += [float(value) for value in eval_loss]  # type: ignore[union-attr]
            by_step.plot(eval_steps, eval_loss, color=color, linestyle="--", linewidth=0.9, marker="o",
                         markersize=3)
        by_time.plot(run["elapsed_s"], smoothed, color=color, linewidth=1.8)
    finite = [value for value in shown if math.isfinite(value) and value > 0]
    logarithmic = bool(finite) and max(finite) / min(finite) > 20
    for axis in (by_step, by_time):
        if logarithmic:
            axis.set_yscale("log")
            axis.set_ylim(min(finite) / 1.5, max(finite) * 1.5)
        axis.grid(alpha=0.3, which="both" if logarithmic else "major")
    by_step.set(xlabel="step", ylabel="loss", title="loss per step")
    by_time.set(xlabel="wall-clock time (s)", ylabel="training loss (smoothed)", title="loss per second")
    from matplotlib.lines import Line2D

    handles, labels = by_step.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.055), ncol=min(3, len(labels)),
                  fontsize="small", frameon=False)
    styles = [Line2D([], [], color="gray", linewidth=1.8), Line2D([], [], color="gray", linewidth=0.6, alpha=0.4),
              Line2D([], [], color="gray", linestyle="--", marker="o", markersize=3)]
    figure.legend(styles, [f"training loss, moving average of {window} steps",
                           "training loss per batch", "held-out loss"],
                  loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize="small", frameon=False)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.11, 1, 1))  # room for the legend under the panels
    return _save(figure, path, dpi)


def _save(figure: Any, path: str | os.PathLike[str], dpi: int) -> Path:
    """Write ``figure`` as a PNG through a temporary file, so a reader never sees half an image."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    figure.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path
