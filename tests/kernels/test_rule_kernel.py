"""Every rule runs through a kernel (``kernel_for``) equal to its own ``update``; the default
``update_stacked`` is the per-tensor update over the stack."""

from __future__ import annotations

import pytest
import torch

from lopt_hf.kernels import RuleKernel, kernel_for
from support import small_rule

from lopt_hf.rules import available_rules, build_rule
from lopt_hf.rules.base import UpdateRule


def loss_kwargs(rule: UpdateRule, stack: int | None = None) -> dict:
    """The keywords of a rule's update: a scheduled rule's control row (stacked ``(stack, C)`` for
    ``update_stacked``), the loss for rules that read it, else nothing."""
    if rule.scheduled:
        row = torch.cat([torch.tensor([0.7]), torch.softmax(torch.arange(rule.num_mixed_networks, dtype=torch.float32), 0)])
        return {"control": row if stack is None else row.expand(stack, -1)}
    return {"loss": torch.tensor(1.25)} if rule.needs_loss else {}


@pytest.mark.parametrize("rule_name", available_rules())
@pytest.mark.parametrize("shape", [(), (5,), (6, 4), (2, 3, 4)])
def test_update_stacked_is_update_of_each_tensor(rule_name: str, shape: tuple[int, ...]) -> None:
    rule = small_rule(rule_name)
    gen = torch.Generator().manual_seed(1)
    theta = rule.init_theta(gen)
    params, grads = torch.randn(3, *shape, generator=gen), torch.randn(3, *shape, generator=gen) * 1e-2
    states = [rule.init_state(params[i]) for i in range(3)]
    stacked, stacked_states = rule.update_stacked(
        theta, params, grads, {key: torch.stack([s[key] for s in states]) for key in states[0]}, 2,
        **loss_kwargs(rule, stack=3))
    for i in range(3):
        update, new_state = rule.update(theta, params[i], grads[i], states[i], 2, **loss_kwargs(rule))
        tolerance = {"rtol": 1e-5, "atol": 1e-7} if rule.stackable else {"rtol": 0, "atol": 0}  # batched kernels
        torch.testing.assert_close(stacked[i], update, **tolerance)
        for key, value in new_state.items():
            torch.testing.assert_close(stacked_states[key][i], value, **tolerance)


@pytest.mark.parametrize("rule_name", available_rules())
def test_kernel_step_of_one_equals_update(rule_name: str) -> None:
    """Rules without a kernel of their own: the kernel's stack of one is exactly ``rule.update``."""
    rule = small_rule(rule_name)
    gen = torch.Generator().manual_seed(2)
    theta = rule.init_theta(gen)
    kernel = kernel_for(rule, theta)
    assert kernel.rule is rule and kernel.stacks == rule.stackable
    param, grad = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen) * 1e-2
    state = kernel.init_state(param)
    with torch.no_grad():
        for step in range(2):
            expected, expected_state = rule.update(theta, param, grad, state, step, chunk_size=16, **loss_kwargs(rule))
            got, (new_state,) = kernel.update_stack(param[None], grad[None], [state], step, chunk_size=16,
                                                    **loss_kwargs(rule, stack=1))
            state = {**state, **new_state}
            if type(kernel) is RuleKernel:
                assert torch.equal(got[0], expected)
                assert all(torch.equal(state[key], value) for key, value in expected_state.items())
            else:  # own kernel: tests/kernels/test_<rule>_kernel.py pins it to the rule
                torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-6)
