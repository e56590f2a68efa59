"""Plotting helpers shared by meta-training, evaluation and publishing (matplotlib, imported lazily).

``smooth`` is the one moving average of every curve lopt_hf draws (evaluation plots, the
meta-loss curve, the fine-tuning example); ``plot_meta_loss`` draws a meta-training run's
meta-loss (the run folder's ``meta_loss.png`` and the exported artifact's card plot).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["smooth", "plot_meta_loss"]


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
                   title: str = "meta-loss", dpi: int = 110) -> Path:
    """Save the meta-loss curve (raw and a moving average) as a PNG; returns the path."""
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
    axis.set(xlabel="outer step", ylabel="meta-loss", title=title)
    finite = [value for value in losses if math.isfinite(value)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize="small")
    figure.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    figure.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path
