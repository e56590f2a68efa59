"""Real training loops on scikit-learn digits (``lopt_hf.data``, the training split) with LearnedOptimizer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lopt_hf.data import load_image_dataset
from lopt_hf.optim import LearnedOptimizer
from support import small_rule

from lopt_hf.rules import available_rules, build_rule

STEPS = 60


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    dataset = load_image_dataset("digits", split="train")
    return dataset.images, dataset.labels


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def run(model: nn.Module, optimizer: torch.optim.Optimizer, digits) -> list[float]:
    inputs, labels = digits
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        batch = torch.randint(0, len(inputs), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(loss=loss) if isinstance(optimizer, LearnedOptimizer) else optimizer.step()
        losses.append(loss.item())
    return losses


def sgd_theta(sgd_lr: float) -> dict[str, torch.Tensor]:
    """per_param_mlp meta-parameters that implement plain SGD: a = c·(relu(g) − relu(−g)) = c·g, b = 0."""
    theta = {"w0": torch.zeros(3, 64), "b0": torch.zeros(64), "w1": torch.zeros(64, 2), "b1": torch.zeros(2)}
    theta["w0"][2, 0], theta["w0"][2, 1] = 1.0, -1.0  # hidden 0 = relu(g), hidden 1 = relu(-g)
    coefficient = sgd_lr / 0.01  # the rule multiplies a by step_mult = 0.01
    theta["w1"][0, 0], theta["w1"][1, 0] = coefficient, -coefficient
    return theta


def test_sgd_theta_trains_digits_exactly_like_torch_sgd(digits) -> None:
    learned_model, sgd_model = make_model(), make_model()
    learned = run(learned_model, LearnedOptimizer(learned_model.parameters(), build_rule("per_param_mlp"),
                                                  sgd_theta(0.5)), digits)
    sgd = run(sgd_model, torch.optim.SGD(sgd_model.parameters(), lr=0.5), digits)
    assert learned == pytest.approx(sgd, rel=1e-4)
    assert sum(learned[-10:]) / 10 < 0.6 * learned[0]  # it really learns


@pytest.mark.parametrize("rule_name", available_rules())
def test_every_rule_runs_a_training_loop(rule_name: str, digits) -> None:
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    rule = small_rule(rule_name)
    optimizer = LearnedOptimizer(model.parameters(), rule, rule.init_theta(torch.Generator().manual_seed(0)), lr=0.1)
    optimizer.set_total_steps(STEPS)  # scheduled rules (celo, velo) need it; others ignore it
    losses = run(model, optimizer, digits)
    assert all(math.isfinite(loss) for loss in losses)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
