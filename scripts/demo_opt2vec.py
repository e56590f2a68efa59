"""Demo: the opt2vec learned optimizer (at initialisation) trains a digits classifier, next to AdamW.

Builds an ``opt2vec`` artifact (config.json + model.safetensors + model card), loads it back
with ``load_lopt`` as a ``torch.optim.Optimizer``, trains the same MLP on scikit-learn's digits
with it and with ``torch.optim.AdamW``, and prints both loss curves, the test accuracies and the
peak memory (max RSS) of the process. opt2vec needs the training loss, so each step passes it:
``optimizer.step(loss=loss)``. Its meta-parameters are not meta-trained yet: at initialisation the
rule is close to momentum SGD (``base_lr``, momentum 0.9), with small learned modulations.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lopt_hf import LearnedOptimizer, create_artifact, load_lopt


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (8×8 images, 0–16) and labels.

    Read straight from the CSV that scikit-learn ships: importing ``sklearn.datasets`` would add
    ~65 MB to this demo's peak memory for one small file. Falls back to ``load_digits``.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def digits_split(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) tensors: 80 % / 20 % of the 1,797 digits, shuffled with ``seed``."""
    features, labels = load_digits_arrays()
    inputs, targets = torch.tensor(features / 16.0, dtype=torch.float32), torch.tensor(labels)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(inputs))
    return (inputs[order[:cut]], targets[order[:cut]]), (inputs[order[cut:]], targets[order[cut:]])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data, steps: int, batch_size: int,
          seed: int) -> list[float]:
    inputs, labels = data
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        batch = torch.randint(0, len(inputs), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        if isinstance(optimizer, LearnedOptimizer):
            optimizer.step(loss=loss)  # rules with needs_loss (opt2vec) read it; others ignore it
        else:
            optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    inputs, labels = data
    return float((model(inputs).argmax(dim=1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--base-lr", type=float, default=0.1, help="opt2vec's base learning rate")
    parser.add_argument("--adamw-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the artifact (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny model: threads only add overhead (and the machine is shared)

    with tempfile.TemporaryDirectory() as tmp:
        artifact_dir = Path(args.out or tmp) / "opt2vec-init"
        create_artifact("opt2vec", seed=args.seed, rule_config={"base_lr": args.base_lr},
                        provenance={"source": "scripts/demo_opt2vec.py (init, not meta-trained)"}
                        ).save_pretrained(artifact_dir)
        print(f"artifact: {artifact_dir} {sorted(p.name for p in artifact_dir.iterdir())}")
        train_data, test_data = digits_split(args.seed)

        curves, accuracies, seconds = {}, {}, {}
        for name in ("opt2vec (init)", f"AdamW lr={args.adamw_lr:g}"):
            model = make_model(args.seed)
            optimizer = (load_lopt(artifact_dir, model) if name.startswith("opt2vec")
                         else torch.optim.AdamW(model.parameters(), lr=args.adamw_lr))
            start = time.perf_counter()
            curves[name] = train(model, optimizer, train_data, args.steps, args.batch_size, args.seed)
            seconds[name] = time.perf_counter() - start
            accuracies[name] = accuracy(model, test_data)

    every = max(1, args.steps // 10)
    print(f"\nmean training loss over each {every} steps (digits MLP 64→128→10, batch {args.batch_size})")
    print(f"{'step':>6}" + "".join(f"{name:>24}" for name in curves))
    for start in range(0, args.steps, every):
        window = {name: sum(c[start:start + every]) / len(c[start:start + every]) for name, c in curves.items()}
        print(f"{min(start + every, args.steps):>6}" + "".join(f"{value:>24.4f}" for value in window.values()))
    print(f"{'test accuracy':<14}" + "".join(f"{accuracies[name]:>24.3f}" for name in curves)[8:])
    print(f"{'train seconds':<14}" + "".join(f"{seconds[name]:>24.2f}" for name in curves)[8:])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"\npeak memory (max RSS of this process): {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
