"""lopt_hf.adamw: the one AdamW is torch's functional foreach AdamW — bit for bit torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lopt_hf.adamw import adamw_step
from lopt_hf.optim import ADAMW_ROUTE, ROUTE_KEY, LearnedOptimizer
from lopt_hf.rules import build_rule


def test_adamw_step_is_torch_adamw_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(30, 20, generator=gen), torch.randn(7, generator=gen)]
    reference = [param.clone().requires_grad_() for param in params]
    torch_adamw = torch.optim.AdamW(reference, lr=2e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)
    exp_avgs = [torch.zeros_like(param) for param in params]
    exp_avg_sqs = [torch.zeros_like(param) for param in params]
    for count in range(1, 6):
        grads = [torch.randn(param.shape, generator=gen) for param in params]
        for ref, grad in zip(reference, grads):
            ref.grad = grad.clone()
        torch_adamw.step()
        adamw_step(params, grads, exp_avgs, exp_avg_sqs, [count, count], lr=2e-2, betas=(0.9, 0.95), eps=1e-8,
                   weight_decay=0.1)
        for param, ref, exp_avg, exp_avg_sq in zip(params, reference, exp_avgs, exp_avg_sqs):
            state = torch_adamw.state[ref]
            assert torch.equal(exp_avg, state["exp_avg"]) and torch.equal(exp_avg_sq, state["exp_avg_sq"])
            assert torch.equal(param, ref.detach())


def test_adamw_step_takes_one_count_per_tensor() -> None:
    """Tensors at different step counts in one call step as each would alone (bias corrections per tensor)."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(5, 4, generator=gen), torch.randn(6, generator=gen)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    moments = [(torch.rand(p.shape, generator=gen), torch.rand(p.shape, generator=gen)) for p in params]
    together = [p.clone() for p in params]
    together_moments = [(m.clone(), v.clone()) for m, v in moments]
    adamw_step(together, grads, [m for m, _ in together_moments], [v for _, v in together_moments], [3, 11], lr=0.1)
    for param, grad, (m, v), count, result in zip(params, grads, moments, [3, 11], together):
        alone = param.clone()
        adamw_step([alone], [grad], [m.clone()], [v.clone()], [count], lr=0.1)
        assert torch.equal(alone, result)
    with pytest.raises(ValueError, match="2 step counts for 1 tensors"):
        adamw_step(params[:1], grads[:1], [moments[0][0]], [moments[0][1]], [1, 2], lr=0.1)


def test_adamw_route_trains_like_torch_adamw_bit_for_bit() -> None:
    """A param group on LearnedOptimizer's "adamw" route: parameters and moments equal torch.optim.AdamW's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    twin = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    twin.load_state_dict(model.state_dict())
    rule = build_rule("small_fc_lopt")
    theta = rule.init_theta()
    ours = LearnedOptimizer([{"params": list(model.parameters()), ROUTE_KEY: ADAMW_ROUTE, "betas": (0.9, 0.99),
                              "eps": 1e-6}], rule, theta, lr=3e-2, weight_decay=0.05)
    torch_adamw = torch.optim.AdamW(twin.parameters(), lr=3e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05,
                                    foreach=True)
    data = torch.randn(16, 6)
    for _ in range(4):
        for net, optimizer in ((model, ours), (twin, torch_adamw)):
            optimizer.zero_grad()
            net(data).square().mean().backward()
            optimizer.step()
    for param, ref in zip(model.parameters(), twin.parameters()):
        assert torch.equal(param, ref)
        assert torch.equal(ours.state[param]["exp_avg"], torch_adamw.state[ref]["exp_avg"])
    stats = ours.last_step_stats()
    assert stats["updated_tensors"] == 4 and stats["update_rms_adamw"] > 0


def test_adamw_route_keeps_a_tensor_whose_new_value_overflows() -> None:
    """Stepped together, the tensor whose step overflows keeps its value (and is counted); the other one
    commits torch's AdamW step."""
    big = nn.Parameter(torch.full((5,), -3.3e38))
    small = nn.Parameter(torch.ones(4))
    twin = small.detach().clone().requires_grad_()
    for param in (big, small, twin):
        param.grad = torch.full(param.shape, 0.5)
    rule = build_rule("small_fc_lopt")
    ours = LearnedOptimizer([{"params": [big, small], ROUTE_KEY: ADAMW_ROUTE}], rule, rule.init_theta(), lr=3e37)
    ours.step()  # the first direction is ≈ sign(g), step size lr/(1 − β₁) = 3e38: −3.3e38 − 3e38 overflows
    torch.optim.AdamW([twin], lr=3e37, weight_decay=ours.param_groups[0]["weight_decay"], foreach=True).step()
    assert torch.equal(big.detach(), torch.full((5,), -3.3e38))
    assert torch.equal(small.detach(), twin.detach()) and torch.isfinite(small).all()
    assert ours.num_skipped_nonfinite == 1 and ours.last_step_stats()["updated_tensors"] == 1


def test_adamw_route_skips_a_step_size_beyond_float32() -> None:
    """lr / (1 − β₁ᵗ) above float32's range (torch's kernels cannot take it): skipped and counted, nothing changes."""
    param = nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    rule = build_rule("small_fc_lopt")
    ours = LearnedOptimizer([{"params": [param], ROUTE_KEY: ADAMW_ROUTE}], rule, rule.init_theta(), lr=1e38)
    ours.step()  # step size 1e38 / 0.1 = 1e39
    assert torch.equal(param.detach(), torch.ones(3)) and ours.num_skipped_nonfinite == 1
    assert not ours.state[param]["exp_avg"].any()  # moments untouched
