"""Diagnose learned optimizers: how large is each layer's step relative to the layer's own scale?

Trains one ``lopt-hf eval`` task (default the wide 784-256-256-10 MNIST MLP) with every given
optimizer from the same seed and, after every optimizer step, records per parameter tensor the
*relative step* ``rms(Δp) / rms(p)`` (decoupled weight decay and lr included: what the parameter
really moved) and the training loss. Writes ``step_sizes.json``, ``step_sizes.md`` (per layer: the
median relative step over the first and the last fifth of training, the final loss) and
``step_sizes.png`` (one panel per optimizer, one line per tensor, log scale; the loss underneath).

    python scripts/diagnose_step_sizes.py --optimizers small-fc-lolo=lopt-hf/small-fc-lolo adamw:1e-3 \\
        --task mnist_mlp_wide --steps 200 --out docs/diagnosis

Optimizer specs are those of ``lopt-hf eval`` (a learned-optimizer folder or Hub id, ``adamw:LR``, …;
``adamw-grid`` is not accepted here: give one lr).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from lopt_hf.evaluation.optimizers import parse_optimizer_specs
from lopt_hf.evaluation.tasks import get_task


def relative_steps(task_name: str, spec, steps: int, seed: int, planned_steps: int | None = None
                   ) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float]]:
    """Per tensor name, ``rms(Δp) / rms(p)`` and ``rms(p)`` after every step; and the training losses.

    ``planned_steps``: the length of training the optimizer is told (``set_total_steps``; default ``steps``)
    — more than ``steps`` shows the first part of a longer planned run.
    """
    (_, make_optimizer), = spec.candidates()
    history: dict[str, list[float]] = {}
    scales: dict[str, list[float]] = {}

    def instrumented(model: torch.nn.Module) -> torch.optim.Optimizer:
        optimizer = make_optimizer(model)
        if planned_steps is not None and hasattr(optimizer, "set_total_steps"):
            # the task tells it `steps` first; wrap so the plan stays `planned_steps`
            set_total_steps = optimizer.set_total_steps
            optimizer.set_total_steps = lambda _: set_total_steps(planned_steps)  # type: ignore[method-assign]
        named = list(model.named_parameters())
        before: dict[str, torch.Tensor] = {}

        def pre_hook(*_: object) -> None:
            before.update({name: param.detach().float().clone() for name, param in named})

        def post_hook(*_: object) -> None:
            for name, param in named:
                old, new = before[name], param.detach().float()
                scale = old.square().mean().sqrt().clamp_min(1e-12)
                history.setdefault(name, []).append(float((new - old).square().mean().sqrt() / scale))
                scales.setdefault(name, []).append(float(new.square().mean().sqrt()))

        optimizer.register_step_pre_hook(pre_hook)
        optimizer.register_step_post_hook(post_hook)
        return optimizer

    record = get_task(task_name).run(instrumented, steps=steps, seed=seed)
    return history, scales, record.train_losses


def summary_rows(results: dict[str, dict]) -> list[str]:
    """The markdown table: median relative step per tensor over the first and the last fifth of training."""
    lines = ["| optimizer | tensor | relative step, first 20 % | relative step, last 20 % | rms(p) at the end | "
             "final train loss |", "|---|---|---:|---:|---:|---:|"]
    for label, result in results.items():
        losses = result["train_losses"]
        for name, values in result["relative_steps"].items():
            fifth = max(1, len(values) // 5)
            lines.append(f"| {label} | `{name}` | {statistics.median(values[:fifth]):.2e} | "
                         f"{statistics.median(values[-fifth:]):.2e} | {result['param_rms'][name][-1]:.3g} | "
                         f"{losses[-1]:.3g} |")
    return lines


def plot(results: dict[str, dict], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    figure, axes = plt.subplots(2, len(labels), figsize=(4.2 * len(labels), 6.5), squeeze=False, sharex=True)
    for column, label in enumerate(labels):
        top, bottom = axes[0][column], axes[1][column]
        for name, values in results[label]["relative_steps"].items():
            top.plot(range(1, len(values) + 1), values, label=name, linewidth=1)
        top.set_yscale("log")
        top.set_title(label)
        top.set_ylabel("rms(Δp) / rms(p)")
        bottom.plot(results[label]["train_losses"], color="black", linewidth=1)
        bottom.set_yscale("log")
        bottom.set_xlabel("step")
        bottom.set_ylabel("train loss")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"relative step per tensor, {task}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", required=True, help="lopt-hf eval optimizer specs (LABEL=SPEC)")
    parser.add_argument("--task", default="mnist_mlp_wide", help="a lopt-hf eval task (default mnist_mlp_wide)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--planned-steps", type=int, default=None,
                        help="length of training the optimizers are told (default --steps; e.g. 20000 with --steps "
                             "3000 shows the start of a 10× longer run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path("diagnosis_out"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = parse_optimizer_specs(args.optimizers)
    if any(spec.kind == "adamw-grid" for spec in specs):
        parser.error("adamw-grid runs several lrs: give one, e.g. adamw:3e-3")
    results = {}
    for spec in specs:
        history, scales, losses = relative_steps(args.task, spec, args.steps, args.seed, args.planned_steps)
        results[spec.label] = {"spec": spec.spec, "relative_steps": history, "param_rms": scales,
                               "train_losses": losses}
        print(f"{spec.label}: final train loss {losses[-1]:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_sizes.json").write_text(json.dumps({"task": args.task, "steps": args.steps, "seed": args.seed,
                                                          "planned_steps": args.planned_steps or args.steps,
                                                          "results": results}))
    (args.out / "step_sizes.md").write_text("\n".join(
        [f"# Relative step per tensor: {args.task}, {args.steps} steps (planned {args.planned_steps or args.steps}), "
         f"seed {args.seed}", "", *summary_rows(results),
         "", "![relative steps](step_sizes.png)", ""]))
    plot(results, args.out / "step_sizes.png", args.task)
    print(f"wrote {args.out / 'step_sizes.md'}, step_sizes.png, step_sizes.json")


if __name__ == "__main__":
    main()
