"""Demo: a learned-optimizer artifact trains a digits classifier, next to AdamW.

Steps: build a learned-optimizer artifact (config.json + model.safetensors + model card),
load it back with ``load_lopt`` as a ``torch.optim.Optimizer``, train the same MLP on
scikit-learn's digits with it and with ``torch.optim.AdamW``, print both loss curves and save a
plot. Until lopt_hf ships meta-trained optimizers the artifact holds *randomly initialised*
meta-parameters, so expect it to lose to AdamW: this demo shows the mechanics end to end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from lopt_hf import create_artifact, load_lopt  # noqa: E402


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = load_digits(return_X_y=True)
    return torch.tensor(features / 16.0, dtype=torch.float32), torch.tensor(labels)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, data, steps: int, batch_size: int,
          seed: int) -> list[float]:
    inputs, labels = data
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc=f"{name:>14}", unit="step"):
        batch = torch.randint(0, len(inputs), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", default="small_fc_lopt")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    artifact_dir = out / f"{args.rule}-random-init"
    create_artifact(args.rule, seed=args.seed,
                    provenance={"source": "scripts/demo.py (random init, not meta-trained)"}).save_pretrained(artifact_dir)
    print(f"artifact written to {artifact_dir}: {sorted(p.name for p in artifact_dir.iterdir())}")

    data = digits_tensors()
    curves = {}
    model = make_model(args.seed)
    curves[f"{args.rule} (random init)"] = train(args.rule, model, load_lopt(artifact_dir, model), data,
                                                 args.steps, args.batch_size, args.seed)
    model = make_model(args.seed)
    curves["AdamW lr=1e-3"] = train("AdamW", model, torch.optim.AdamW(model.parameters(), lr=1e-3), data,
                                    args.steps, args.batch_size, args.seed)

    every = max(1, args.steps // 10)
    print(f"\nmean training loss over each {every} steps")
    print(f"{'step':>6}" + "".join(f"{name:>28}" for name in curves))
    for start in range(0, args.steps, every):
        window = {name: sum(c[start:start + every]) / len(c[start:start + every]) for name, c in curves.items()}
        print(f"{start + every:>6}" + "".join(f"{value:>28.4f}" for value in window.values()))

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, losses in curves.items():
        axis.plot(losses, label=name, linewidth=1)
    axis.set(xlabel="step", ylabel="training loss", yscale="log", title="digits MLP 64→128→10")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "demo_loss.png", dpi=120)
    print(f"\nplot saved to {out / 'demo_loss.png'}")


if __name__ == "__main__":
    main()
