"""lopt_hf.adamw: the one AdamW — torch.optim.AdamW's math (moments bit-identical, steps to rounding)."""

from __future__ import annotations

import torch

from lopt_hf.adamw import adamw_step


def test_adamw_step_is_torch_adamw() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(30, 20, generator=gen), torch.randn(7, generator=gen)]
    reference = [param.clone().requires_grad_() for param in params]
    torch_adamw = torch.optim.AdamW(reference, lr=2e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    exp_avgs = [torch.zeros_like(param) for param in params]
    exp_avg_sqs = [torch.zeros_like(param) for param in params]
    for count in range(1, 6):
        grads = [torch.randn(param.shape, generator=gen) for param in params]
        for ref, grad in zip(reference, grads):
            ref.grad = grad.clone()
        torch_adamw.step()
        adamw_step(params, grads, exp_avgs, exp_avg_sqs, count, lr=2e-2, betas=(0.9, 0.95), eps=1e-8,
                   weight_decay=0.1)
        for param, ref, exp_avg, exp_avg_sq in zip(params, reference, exp_avgs, exp_avg_sqs):
            state = torch_adamw.state[ref]
            assert torch.equal(exp_avg, state["exp_avg"]) and torch.equal(exp_avg_sq, state["exp_avg_sq"])
            # torch divides by √v/√(1-β₂ᵗ) and folds lr/(1-β₁ᵗ) into addcdiv: last-bit differences
            torch.testing.assert_close(param, ref.detach(), rtol=0, atol=1e-6)
