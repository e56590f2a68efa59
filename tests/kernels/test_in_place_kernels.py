"""The in-place kernels of small_fc_lopt, mlp_lopt and per_param_mlp equal the rules' own ``update`` bit
for bit — shapes 0-d to 4-d, chunk sizes, several steps, stacks — while advancing the state in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lopt_hf.kernels import RuleKernel, in_place, kernel_for
from lopt_hf.kernels.in_place import InPlaceKernel, MLPLOptKernel, PerParamMLPKernel, SmallFCLOptKernel
from lopt_hf.optim import LearnedOptimizer
from lopt_hf.rules import build_rule

KERNELS = {"small_fc_lopt": SmallFCLOptKernel, "mlp_lopt": MLPLOptKernel, "per_param_mlp": PerParamMLPKernel}
CONFIGS = {"small_fc_lopt": {}, "mlp_lopt": {}, "per_param_mlp": {"hidden_sizes": [8, 8], "activation": "gelu"}}


@pytest.fixture(autouse=True)
def in_place_for_every_size(monkeypatch):
    """These tensors are small: make the kernels take their in-place path anyway (the one under test)."""
    monkeypatch.setattr(in_place, "IN_PLACE_MIN_NUMEL", 0)


def test_small_tensors_take_the_rules_own_update() -> None:
    """Below IN_PLACE_MIN_NUMEL the kernel hands the tensor to the rule: the state is not advanced in place."""
    in_place.IN_PLACE_MIN_NUMEL = 1 << 22  # the module default (the autouse fixture restores its own value)
    rule, theta = rule_and_theta("small_fc_lopt")
    kernel = kernel_for(rule, theta)
    param, grad = torch.randn(30, 20), torch.randn(30, 20)
    state = kernel.init_state(param)
    before = {key: value.clone() for key, value in state.items()}
    direction, (new_state,) = kernel.update_stack(param[None], grad[None], [state], 0, chunk_size=64)
    expected, expected_state = rule.update(theta, param, grad, before, 0, chunk_size=64)
    assert torch.equal(direction[0], expected)
    assert all(torch.equal(state[key], before[key]) for key in state)  # the input state untouched
    assert all(torch.equal(new_state[key], expected_state[key]) for key in expected_state)


def rule_and_theta(name: str, seed: int = 0):
    rule = build_rule(name, **CONFIGS[name])
    gen = torch.Generator().manual_seed(seed)
    # perturbed decay offsets and biases: every theta entry matters
    return rule, {key: value + 0.05 * torch.randn(value.shape, generator=gen)
                  for key, value in rule.init_theta(gen).items()}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_each_rule_gets_its_in_place_kernel(name: str) -> None:
    rule, theta = rule_and_theta(name)
    kernel = kernel_for(rule, theta)
    assert type(kernel) is KERNELS[name] and isinstance(kernel, InPlaceKernel) and not kernel.stacks


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("shape", [(), (37,), (130, 70), (2, 3, 40, 9)])
@pytest.mark.parametrize("chunk_size", [None, 16, 1000])
def test_kernel_is_the_rule_bit_for_bit(name: str, shape: tuple[int, ...], chunk_size: int | None) -> None:
    rule, theta = rule_and_theta(name)
    kernel = kernel_for(rule, theta)
    gen = torch.Generator().manual_seed(1)
    param = torch.randn(shape, generator=gen)
    state = kernel.init_state(param)
    reference = {key: value.clone() for key, value in state.items()}
    for step in range(3):
        grad = torch.randn(shape, generator=gen) * 1e-2
        with torch.no_grad():
            expected, reference = rule.update(theta, param, grad, reference, step, chunk_size)
        kept = {key: value for key, value in state.items()}
        got, (new_state,) = kernel.update_stack(param[None], grad[None], [state], step, chunk_size)
        assert torch.equal(got[0], expected)
        assert new_state.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(new_state[key], value), key
            if key in ("momentum", "rms"):
                assert new_state[key] is kept[key]  # the full-size accumulators are advanced in place
        state = {**state, **new_state}
        param = param - 0.5 * expected


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_a_stack_is_each_tensor_on_its_own(name: str) -> None:
    rule, theta = rule_and_theta(name, seed=3)
    kernel = kernel_for(rule, theta)
    gen = torch.Generator().manual_seed(4)
    params, grads = torch.randn(3, 9, 11, generator=gen), torch.randn(3, 9, 11, generator=gen) * 1e-2
    states = [kernel.init_state(params[i]) for i in range(3)]
    references = [{key: value.clone() for key, value in state.items()} for state in states]
    for step in range(2):
        got, new_states = kernel.update_stack(params, grads, states, step, chunk_size=20)
        for i in range(3):
            with torch.no_grad():  # (deployment's arithmetic: the rule reduces differently under autograd)
                expected, references[i] = rule.update(theta, params[i], grads[i], references[i], step, chunk_size=20)
            assert torch.equal(got[i], expected)
            assert all(torch.equal(new_states[i][key], value) for key, value in references[i].items())
        states = new_states


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_a_non_contiguous_state_is_replaced_not_written_through(name: str) -> None:
    rule, theta = rule_and_theta(name)
    kernel = kernel_for(rule, theta)
    gen = torch.Generator().manual_seed(5)
    param, grad = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    state = {key: torch.randn(value.mT.shape if value.dim() >= 2 else value.shape, generator=gen).mT
             if value.dim() >= 2 else torch.randn(value.shape, generator=gen) for key, value in
             kernel.init_state(param).items()}
    state = {key: value.abs() for key, value in state.items()}  # second moments are non-negative
    before = {key: value.clone() for key, value in state.items()}
    with torch.no_grad():
        expected, expected_state = rule.update(theta, param, grad, before, 0, chunk_size=7)
    got, (new_state,) = kernel.update_stack(param[None], grad[None], [state], 0, chunk_size=7)
    # (reductions over a column-major accumulator sum in another order: equal up to rounding)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-9)
    for key, value in expected_state.items():
        torch.testing.assert_close(new_state[key], value, rtol=1e-6, atol=0)
        assert new_state[key].is_contiguous() or key not in ("momentum", "rms")  # (v_row/v_col: new tensors)
    for key, value in state.items():
        if not value.is_contiguous():
            assert torch.equal(value, before[key])  # left alone; the new state is a contiguous copy


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("lr", [1.0, 0.3])
def test_apply_step_rounds_as_the_per_tensor_kernel(name: str, lr: float) -> None:
    rule, theta = rule_and_theta(name)
    gen = torch.Generator().manual_seed(6)
    params, direction = torch.randn(1, 1100, 1000, generator=gen), torch.randn(1, 1100, 1000, generator=gen)
    expected = params.clone()
    RuleKernel(rule, theta).apply_step(expected, direction, lr)
    kernel_for(rule, theta).apply_step(params, direction, lr)
    assert torch.equal(params, expected)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_learned_optimizer_steps_as_the_rule(name: str) -> None:
    """Through LearnedOptimizer (weights, a bias, a 4-D tensor): each parameter moves by ``lr·update``."""
    rule, theta = rule_and_theta(name)
    torch.manual_seed(7)
    model = nn.ModuleDict({"linear": nn.Linear(40, 30), "conv": nn.Conv2d(3, 4, 3)})
    params = list(model.parameters())
    optimizer = LearnedOptimizer(params, rule, theta, lr=0.5, chunk_size=64)
    references = [rule.init_state(p) for p in params]
    for step in range(3):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        optimizer.step()
        for index, (p, old) in enumerate(zip(params, before)):
            with torch.no_grad():
                update, references[index] = rule.update(theta, old, p.grad, references[index], step, chunk_size=64)
            assert torch.equal(p.detach(), old - 0.5 * update)
