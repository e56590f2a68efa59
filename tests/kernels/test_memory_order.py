"""Kernels hand their rule contiguous tensors: a layout-sensitive rule (Celo, VeLO) gets an ``nn.Linear`` weight
and its gradient as transposed views, and a view's strided pieces are slow and may sum in another order. Below
``CONTIGUOUS_BELOW`` elements the kernel copies them, so a transposed view steps exactly like its contiguous copy
whichever kernel runs it; larger tensors keep their views (memory near AdamW's)."""

from __future__ import annotations

import pytest
import torch

from lopt_hf.kernels import RuleKernel, kernel_for
from lopt_hf.kernels import base as kernel_base
from lopt_hf.kernels.base import contiguous_below
from lopt_hf.rules import build_rule
from support import SMALL_RULE_CONFIGS


def test_contiguous_below_copies_small_views_only() -> None:
    view = torch.randn(1, 30, 20).mT
    small = contiguous_below(view, 601)
    assert small.is_contiguous() and torch.equal(small, view)
    assert contiguous_below(view, 600) is view
    contiguous = torch.randn(2, 3)
    assert contiguous_below(contiguous, 100) is contiguous


@pytest.mark.parametrize("name", ["celo", "velo"])
@pytest.mark.parametrize("kernel_kind", ["in place", "the rule's update"])
def test_a_transposed_view_steps_as_its_contiguous_copy(name: str, kernel_kind: str) -> None:
    rule = build_rule(name, **SMALL_RULE_CONFIGS.get(name, {}))
    gen = torch.Generator().manual_seed(0)
    theta = {key: value + 0.05 * torch.randn(value.shape, generator=gen) for key, value in rule.init_theta(gen).items()}
    param = torch.randn(1, 70, 130, generator=gen).mT  # (1, 130, 70) lying column-major, as LearnedOptimizer hands it
    control = torch.rand(1, 1 + rule.num_mixed_networks, generator=gen) + 0.5
    results = []
    for as_given in (param, param.contiguous()):
        kernel = kernel_for(rule, theta) if kernel_kind == "in place" else RuleKernel(rule, theta)
        state = kernel.init_state(as_given[0])
        for step in range(3):
            grad = torch.randn(1, 70, 130, generator=torch.Generator().manual_seed(step)).mT * 1e-2
            direction, (new_state,) = kernel.update_stack(as_given, grad if as_given is param else grad.contiguous(),
                                                          [state], step, chunk_size=1000, control=control)
            state = {**state, **new_state}
        results.append((direction, state))
    (direction_view, state_view), (direction_copy, state_copy) = results
    assert torch.equal(direction_view, direction_copy)
    assert all(torch.equal(state_view[key], value) for key, value in state_copy.items())


def test_large_tensors_keep_their_views(monkeypatch) -> None:
    """Above the threshold the view itself reaches the rule (no full-size copies of the parameter and gradient)."""
    monkeypatch.setattr(kernel_base, "CONTIGUOUS_BELOW", 100)
    rule = build_rule("celo_adam")
    seen = []

    class Recording(type(rule)):
        def update_stacked(self, theta, params, grads, *args, **kwargs):
            seen.append((params.is_contiguous(), grads.is_contiguous()))
            return super().update_stacked(theta, params, grads, *args, **kwargs)

    recording = Recording()
    kernel = RuleKernel(recording, recording.init_theta(torch.Generator().manual_seed(0)))
    view = torch.randn(1, 20, 30).mT
    kernel.update_stack(view, view * 1e-2, [kernel.init_state(view[0])], 0, control=torch.ones(1, 1))
    assert seen == [(False, False)]
