"""LearnedOptimizer runs Celo-Adam (the shipped default ``celo-adam-ns`` among them) on stacks of
same-shape tensors, bit for bit as one tensor at a time (the logged update RMS up to rounding).

Its ``update_stacked`` does Adam's element-wise arithmetic once per stack and Newton–Schulz per matrix,
so stacking changes no bit: parameters, Adam's moments and the scheduler's LSTM rows are compared with
``torch.equal`` against the same rule with stacking switched off.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lopt_hf.load import load_lopt
from lopt_hf.optim import LearnedOptimizer
from lopt_hf.rules.celo import CeloAdam
from support import RepeatedBlocks

STEPS = 4


class PerTensor(CeloAdam):
    """Celo-Adam not stacked: every tensor is a stack of one (how it was deployed before it stacked)."""

    stackable = False


class Recording(CeloAdam):
    """Celo-Adam recording the size of each stack its kernel hands it."""

    def update_stacked(self, theta, params, grads, states, step, chunk_size=None, *, control):  # noqa: ANN001, ANN201
        self.__dict__.setdefault("stack_sizes", []).append(params.shape[0])
        return super().update_stacked(theta, params, grads, states, step, chunk_size, control=control)


def optimizer(model: nn.Module, rule_class: type[CeloAdam], lr: float) -> LearnedOptimizer:
    opt = load_lopt("lopt-hf/celo-adam-ns", model, lr=lr, weight_decay=0.1)
    opt.rule = rule_class.from_hyperparameters(opt.rule.hyperparameters())
    opt.set_total_steps(STEPS)
    return opt


def set_grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for param in model.parameters():
        scale = 1e4 if step == 2 else 1e-2  # step 2: clipped to ±1000 by the rule
        param.grad = torch.randn(param.shape, generator=gen) * scale


@pytest.mark.parametrize("lr", [1.0, 0.3])  # 0.3: lr·step is rounded before the subtraction, as per tensor
def test_stacked_steps_are_the_per_tensor_steps_bit_for_bit(lr: float) -> None:
    stacked_model, single_model = RepeatedBlocks(), RepeatedBlocks()
    stacked, single = optimizer(stacked_model, Recording, lr), optimizer(single_model, PerTensor, lr)
    assert stacked.rule.orthogonalize and stacked.rule.tensor_features  # the shipped default's extensions
    for step in range(STEPS):
        set_grads(stacked_model, step)
        set_grads(single_model, step)
        stacked.step(loss=torch.tensor(2.0 - 0.1 * step))
        single.step(loss=torch.tensor(2.0 - 0.1 * step))
        for (name, a), b in zip(stacked_model.named_parameters(), single_model.parameters()):
            assert torch.equal(a, b), f"step {step}, {name}"
    for param, twin in zip(stacked_model.parameters(), single_model.parameters()):
        for key, value in stacked.state[param].items():
            expected = single.state[twin][key]
            assert torch.equal(value, expected) if isinstance(value, torch.Tensor) else value == expected, key
    stats, expected_stats = stacked.last_step_stats(), single.last_step_stats()
    assert stats.keys() == expected_stats.keys()  # the logged RMS sums its rows per stack: equal up to rounding
    assert all(value == pytest.approx(expected_stats[key], rel=1e-6) for key, value in stats.items())
    # the same-shape tensors went through the rule together: the nine vectors of length 12 (norm
    # weights and biases, down biases) plus the conv biases, the three up and three down weights
    sizes = stacked.rule.stack_sizes[-len(stacked.rule.stack_sizes) // STEPS:]
    learned = sum(len(group["params"]) for group in stacked.param_groups if group["route"] == "learned")
    assert max(sizes) == 11 and sum(sizes) == learned and len(sizes) < learned
