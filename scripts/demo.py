"""Demo: train with a learned optimizer shipped in lopt_hf, next to AdamW — or meta-train your own first.

Default (``make demo``):

1. ``load_lopt("lopt-hf/celo-adam-ns", model)`` — the published Celo-Adam with Newton–Schulz for matrices and
   per-tensor scheduler inputs, fine-tuned by lopt_hf (``lopt_hf/pretrained/celo-adam-ns``: artifact + model
   card), loaded offline by its
   short name. It plans its learning rate over the run, so the loop tells it the number of steps
   (``optimizer.set_total_steps``) and each step's loss (``optimizer.step(loss=...)``).
2. Train a fresh digits MLP with it and with AdamW (default lr 1e-3 and a tuned 1e-2) on the same
   batches; print the curves and test accuracy.
3. Save ``demo_out/demo_loss.png`` (loss per step and per second of wall-clock time, each optimizer's
   measured cost per step in the legend) and ``demo_out/demo_metrics.json`` (the same numbers).

``--metatrain`` instead meta-trains one first with the quickstart config (``configs/quickstart.yaml``:
small_fc_lopt, PES on digits MLPs, about a minute on a CPU core), exports it as a Hub artifact
(``demo_out/run/final``: config.json + model.safetensors + model card, ready for ``lopt-hf push``)
and trains with that. ``--artifact NAME_OR_DIR`` uses any other artifact (folder, Hub repo id or
shipped name, e.g. the research baseline ``lopt-hf/small-fc-lolo``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

from lopt_hf import LearnedOptimizer, load_lopt
from lopt_hf.plotting import plot_loss_and_step_cost

REPO_ROOT = Path(__file__).resolve().parent.parent


def metatrain(out: Path, overrides: list[str]) -> tuple[Path, list[float]]:
    """Run the quickstart config into ``out/run``; return the exported artifact and meta-losses."""
    from lopt_hf.metatrain.config import load_config
    from lopt_hf.publish.metatrain_command import train_and_export

    config = load_config(REPO_ROOT / "configs" / "quickstart.yaml", [f"output_dir={out / 'run'}", *overrides])
    print(f"[1/4] meta-training {config.rule.name} with {config.estimator.name.upper()} on {config.task.dataset} "
          f"MLPs for {config.outer_steps} outer steps")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    resume = (config.run_dir / "checkpoints").exists()  # a re-run continues (or just re-exports) the last one
    result = train_and_export(config, resume=resume)
    assert result.artifact_dir is not None
    return result.artifact_dir, result.meta_losses


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, data, steps: int, batch_size: int,
          seed: int, eval_every: int) -> dict[str, Any]:
    """Train on the same batches for every optimizer; return the curves, the held-out loss every ``eval_every``
    steps, the test accuracy and the measured cost of a step (wall clock, held-out evaluations excluded)."""
    x_train, y_train, x_test, y_test = data
    generator = torch.Generator().manual_seed(seed)
    learned = isinstance(optimizer, LearnedOptimizer)
    if learned:
        optimizer.set_total_steps(steps)  # rules with a learned schedule plan over the run (ignored by others)
    losses, elapsed, step_ms, optimizer_ms = [], [], [], []
    eval_steps, eval_losses = [], []
    clock = 0.0
    for step in tqdm(range(1, steps + 1), desc=f"{name:>32}", unit="step", leave=False):
        batch = torch.randint(0, len(x_train), (batch_size,), generator=generator)
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        before_step = time.perf_counter()
        if learned:
            optimizer.step(loss=loss.detach())  # the loss feeds a learned scheduler's features (ignored by others)
        else:
            optimizer.step()
        end = time.perf_counter()
        clock += end - start
        losses.append(loss.item())
        elapsed.append(clock)
        step_ms.append(1e3 * (end - start))
        optimizer_ms.append(1e3 * (end - before_step))
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                eval_steps.append(step)
                eval_losses.append(nn.functional.cross_entropy(model(x_test), y_test).item())
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    return {"train_loss": losses, "elapsed_s": elapsed, "eval_steps": eval_steps, "eval_loss": eval_losses,
            "test_loss": eval_losses[-1], "test_accuracy": accuracy,
            "ms_per_step": statistics.median(step_ms), "ms_per_optimizer_step": statistics.median(optimizer_ms)}


def digits_split(seed: int):
    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(features / 16.0, labels, test_size=0.2, random_state=seed)
    return (torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train),
            torch.tensor(x_test, dtype=torch.float32), torch.tensor(y_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="lopt-hf/celo-adam-ns",
                        help="learned optimizer to train with: shipped name, folder or Hub repo id")
    parser.add_argument("--metatrain", action="store_true",
                        help="meta-train one with configs/quickstart.yaml first and use it instead of --artifact")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the fresh digits MLP")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--seed", type=int, default=123, help="seed of the fresh MLP and its batches")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="with --metatrain: override the quickstart config, e.g. --set outer_steps=200")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    meta_losses: list[float] = []
    if not args.metatrain:
        artifact = args.artifact
        print(f"[1/3] no meta-training needed: using the learned optimizer {artifact} "
              f"(--metatrain meta-trains your own first)")
    else:
        artifact_dir, meta_losses = metatrain(out, args.overrides)
        artifact = str(artifact_dir)
        print(f"[2/4] exported to {artifact_dir}: {sorted(p.name for p in artifact_dir.iterdir())}")
        print(f"      publish it with: lopt-hf push {artifact_dir} <you>/<repo>")

    total = 4 if args.metatrain else 3
    print(f"[{total - 1}/{total}] training a fresh digits MLP 64→32→10 for {args.steps} steps (seed {args.seed})")
    data = digits_split(args.seed)
    runs: dict[str, dict[str, Any]] = {}
    candidates = {
        f"learned: {Path(artifact).name if args.metatrain else artifact}": lambda model: load_lopt(artifact, model),
        "AdamW lr=1e-3": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
        "AdamW lr=1e-2": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-2),
    }
    for name, make_optimizer in candidates.items():
        model = make_model(args.seed)
        runs[name] = train(name, model, make_optimizer(model), data, args.steps, args.batch_size, args.seed,
                           eval_every=max(1, args.steps // 15))

    every = max(1, args.steps // 10)
    print(f"\nmean training loss over each {every} steps")
    print(f"{'step':>9}" + "".join(f"{name:>32}" for name in runs))
    for start in range(0, args.steps, every):
        window = [sum(run["train_loss"][start:start + every]) / len(run["train_loss"][start:start + every])
                  for run in runs.values()]
        print(f"{start + every:>9}" + "".join(f"{value:>32.4f}" for value in window))
    for label, key, form in (("test loss", "test_loss", ".4f"), ("test acc", "test_accuracy", ".3f"),
                             ("ms/step", "ms_per_step", ".2f"), ("opt. ms", "ms_per_optimizer_step", ".2f")):
        print(f"{label:>9}" + "".join(f"{run[key]:>32{form}}" for run in runs.values()))
    print("(ms/step: median wall-clock time of one training step, forward + backward + optimizer step; "
          "opt. ms: the optimizer's step alone)")

    task = (f"Digits MLP 64→32→10, learned optimizer vs AdamW: {args.steps} steps, batch {args.batch_size}, "
            f"seed {args.seed}, {len(data[2])} held-out images")
    metrics = {"task": task, "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
               "torch_threads": torch.get_num_threads(), "optimizers": runs}
    (out / "demo_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    plot_loss_and_step_cost(runs, out / "demo_loss.png", title=task, meta_losses=meta_losses or None, dpi=90)
    print(f"\n[{total}/{total}] plot saved to {out / 'demo_loss.png'}, numbers to {out / 'demo_metrics.json'}")

if __name__ == "__main__":
    main()
