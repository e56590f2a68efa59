"""Demo: train with a learned optimizer shipped in lopt_hf, next to AdamW — or meta-train your own first.

Default (``make demo``):

1. ``load_lopt("lopt-hf/small-fc-lolo", model)`` — small_fc_lopt meta-trained with LoLO by lopt_hf
   (``lopt_hf/pretrained/small-fc-lolo``: artifact + model card), loaded offline by its short name.
2. Train a fresh digits MLP with it and with AdamW (default lr 1e-3 and a tuned 1e-2) on the same
   batches; print the curves and test accuracy.
3. Save ``demo_out/demo_loss.png``.

``--metatrain`` instead meta-trains one first with the quickstart config (``configs/quickstart.yaml``:
small_fc_lopt, PES on digits MLPs, about a minute on a CPU core), exports it as a Hub artifact
(``demo_out/run/final``: config.json + model.safetensors + model card, ready for ``lopt-hf push``)
and trains with that. ``--artifact NAME_OR_DIR`` uses any other artifact (folder, Hub repo id or
shipped name, e.g. ``lopt-hf/celo2-base-mini``).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lopt_hf import load_lopt  # noqa: E402

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
          seed: int) -> tuple[list[float], float]:
    """Train on the same batches for every optimizer; return the loss curve and test accuracy."""
    x_train, y_train, x_test, y_test = data
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc=f"{name:>32}", unit="step", leave=False):
        batch = torch.randint(0, len(x_train), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    return losses, accuracy


def digits_split(seed: int):
    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(features / 16.0, labels, test_size=0.2, random_state=seed)
    return (torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train), torch.tensor(x_test, dtype=torch.float32),
            torch.tensor(y_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default="lopt-hf/small-fc-lolo",
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
    curves, accuracies = {}, {}
    candidates = {
        f"learned: {Path(artifact).name if args.metatrain else artifact}": lambda model: load_lopt(artifact, model),
        "AdamW lr=1e-3": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
        "AdamW lr=1e-2": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-2),
    }
    for name, make_optimizer in candidates.items():
        model = make_model(args.seed)
        curves[name], accuracies[name] = train(name, model, make_optimizer(model), data, args.steps,
                                               args.batch_size, args.seed)

    every = max(1, args.steps // 10)
    print(f"\nmean training loss over each {every} steps")
    print(f"{'step':>6}" + "".join(f"{name:>32}" for name in curves))
    for start in range(0, args.steps, every):
        window = [sum(c[start:start + every]) / len(c[start:start + every]) for c in curves.values()]
        print(f"{start + every:>6}" + "".join(f"{value:>32.4f}" for value in window))
    print(f"{'test acc':>6}" + "".join(f"{accuracies[name]:>32.3f}" for name in curves))

    figure, axes = plt.subplots(1, 2 if meta_losses else 1, figsize=(11 if meta_losses else 6, 4), squeeze=False)
    if meta_losses:
        axes[0, 0].plot(meta_losses, linewidth=0.8)
        axes[0, 0].set(xlabel="outer step", ylabel="meta-loss (normalised inner loss)", title="meta-training (PES)")
    axis = axes[0, -1]
    for name, losses in curves.items():
        axis.plot(losses, label=f"{name} (test acc {accuracies[name]:.3f})", linewidth=1)
    axis.set(xlabel="step", ylabel="training loss", yscale="log", title="fresh digits MLP 64→32→10")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "demo_loss.png", dpi=120)
    print(f"\n[{total}/{total}] plot saved to {out / 'demo_loss.png'}")


if __name__ == "__main__":
    main()
