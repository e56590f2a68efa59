"""The in-place kernels of the scheduled rules (celo, velo, celo_adam) equal the rules' own ``update`` bit for
bit — shapes 0-d to 4-d, chunk sizes, several steps, a control row per tensor — while advancing the
full-size accumulators in place; through LearnedOptimizer the in-place path gives the same parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lopt_hf.kernels import in_place, kernel_for
from lopt_hf.kernels.celo import CeloAdamKernel, CeloKernel
from lopt_hf.optim import LearnedOptimizer
from lopt_hf.rules import build_rule
from support import SMALL_RULE_CONFIGS

RULES = {"celo": ({}, CeloKernel), "velo": (SMALL_RULE_CONFIGS["velo"], CeloKernel),
         "celo_adam": ({}, CeloAdamKernel), "celo_adam_param_scale": ({"param_scale_mult": True}, CeloAdamKernel)}


@pytest.fixture(autouse=True)
def in_place_for_every_size(monkeypatch):
    """These tensors are small: make the kernels take their in-place path anyway (the one under test)."""
    monkeypatch.setattr(in_place, "IN_PLACE_MIN_NUMEL", 0)


def rule_and_theta(name: str, seed: int = 0):
    config, _ = RULES[name]
    rule = build_rule(name.removesuffix("_param_scale"), **config)
    gen = torch.Generator().manual_seed(seed)
    return rule, {key: value + 0.05 * torch.randn(value.shape, generator=gen)
                  for key, value in rule.init_theta(gen).items()}


def control_row(rule, gen: torch.Generator) -> torch.Tensor:
    """A control row as the scheduler emits it: ``lr_mult`` first, then the mixing weights."""
    return torch.rand(1 + rule.num_mixed_networks, generator=gen) + 0.5


@pytest.mark.parametrize("name", sorted(RULES))
def test_each_scheduled_rule_gets_its_in_place_kernel(name: str) -> None:
    rule, theta = rule_and_theta(name)
    assert type(kernel_for(rule, theta)) is RULES[name][1]


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("shape", [(), (37,), (130, 70), (2, 3, 40, 9)])
@pytest.mark.parametrize("chunk_size", [None, 128, 1000])
def test_kernel_is_the_rule_bit_for_bit(name: str, shape: tuple[int, ...], chunk_size: int | None) -> None:
    rule, theta = rule_and_theta(name)
    kernel = kernel_for(rule, theta)
    gen = torch.Generator().manual_seed(1)
    param = torch.randn(shape, generator=gen)
    state = kernel.init_state(param)
    reference = {key: value.clone() for key, value in state.items()}
    for step in range(3):
        grad = torch.randn(shape, generator=gen) * (2e3 if step == 1 else 1e-2)  # step 1: beyond grad_clip
        control = control_row(rule, gen)
        with torch.no_grad():
            expected, new_reference = rule.update(theta, param, grad, reference, step, chunk_size, control=control)
        kept = dict(state)
        got, (new_state,) = kernel.update_stack(param[None], grad[None], [state], step, chunk_size,
                                                control=control[None])
        assert torch.equal(got[0], expected)
        assert set(new_state) == set(new_reference)
        for key, value in new_reference.items():
            assert torch.equal(new_state[key], value), key
            if key in ("momentum", "rms"):
                assert new_state[key] is kept[key]  # the full-size accumulators are advanced in place
        state, reference = {**state, **new_state}, {**reference, **new_reference}
        param = param - 0.5 * expected


@pytest.mark.parametrize("name", ["celo", "celo_adam"])
def test_small_tensors_take_the_rules_own_update(name: str) -> None:
    in_place.IN_PLACE_MIN_NUMEL = 1 << 22  # the module default (the autouse fixture restores its own value)
    rule, theta = rule_and_theta(name)
    kernel = kernel_for(rule, theta)
    param, grad = torch.randn(30, 20), torch.randn(30, 20)
    state = kernel.init_state(param)
    before = {key: value.clone() for key, value in state.items()}
    control = control_row(rule, torch.Generator().manual_seed(2))
    kernel.update_stack(param[None], grad[None], [state], 0, chunk_size=64, control=control[None])
    assert all(torch.equal(state[key], before[key]) for key in state)  # the input state untouched


@pytest.mark.parametrize("name", ["celo", "celo_adam"])
def test_learned_optimizer_in_place_equals_the_functional_path(name: str, monkeypatch) -> None:
    """Weights, a bias and a conv kernel, three steps with the scheduler running: the in-place path
    (every tensor) and the rule's own update (no tensor) leave the same parameters and state."""
    rule, theta = rule_and_theta(name)
    results = []
    for threshold in (0, 1 << 40):
        monkeypatch.setattr(in_place, "IN_PLACE_MIN_NUMEL", threshold)
        torch.manual_seed(7)
        model = nn.ModuleDict({"linear": nn.Linear(40, 30), "conv": nn.Conv2d(3, 4, 3)})
        optimizer = LearnedOptimizer(model.parameters(), rule, theta, lr=0.5, chunk_size=64)
        optimizer.set_total_steps(10)
        gen = torch.Generator().manual_seed(8)
        for step in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            optimizer.step(loss=torch.tensor(2.0 - 0.1 * step))
        results.append(([p.detach().clone() for p in model.parameters()], optimizer.state_dict()["state"]))
    (params_in_place, state_in_place), (params_rule, state_rule) = results
    assert all(torch.equal(a, b) for a, b in zip(params_in_place, params_rule))
    for index, state in state_rule.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(state_in_place[index][key], value), (index, key)
