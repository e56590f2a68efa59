"""AdamW, once: the foreach update that ``LearnedOptimizer``'s ``"adamw"`` route runs.

``torch.optim.AdamW`` / ``optax.adamw`` math — bias-corrected first and second moments, decoupled
weight decay — on lists of tensors with ``torch._foreach`` kernels, in two halves so that a caller
can look at the step before it is applied (``LearnedOptimizer`` logs its RMS):

* :func:`adamw_directions` — update the moments in place and return ``m̂ / (√v̂ + eps)``;
* :func:`apply_decoupled_step` — ``p ← p·(1 − lr·weight_decay) − lr·direction`` in place;
* :func:`adamw_step` — both.

Why not ``torch.optim.adamw.adamw(foreach=True)``: its moments are bit-identical, but it divides
by ``√v / √(1 − β₂ᵗ)`` and folds ``lr / (1 − β₁ᵗ)`` into ``addcdiv``, where this computes
``√(v / (1 − β₂ᵗ))`` and ``m / (1 − β₁ᵗ)``; parameters then differ in the last bits (measured: up
to 2.4e-7 absolute on unit-scale weights after 5 steps). Keeping this arithmetic keeps every
``"adamw"``-routed step (Celo2's harness) bit-identical to the artifacts and tests made with it;
it also keeps float32 moments for bf16 parameters, which torch's grouping by dtype does not.

These functions do not check their input: ``LearnedOptimizer`` hands them only gradients whose
elements are all below ``lopt_hf.optim.ADAMW_GRAD_LIMIT`` in magnitude (1e19), so ``g²`` and the
second moment stay finite (a larger or non-finite gradient is skipped and counted there).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["adamw_directions", "adamw_step", "apply_decoupled_step"]


def adamw_directions(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], step_count: int,
                     betas: tuple[float, float], eps: float) -> list[Tensor]:
    """One AdamW moment update, in place, and the bias-corrected directions ``m̂ / (√v̂ + eps)``.

    Args:
        grads: float32 gradients (one per tensor).
        exp_avgs, exp_avg_sqs: float32 first and second moments, updated in place
            (``m ← m + (1 − β₁)(g − m)``, ``v ← β₂·v + (1 − β₂)·g²``).
        step_count: the 1-based count of this step (the same for every tensor in the lists).
        betas: ``(β₁, β₂)``; eps: added to ``√v̂``.

    Returns:
        New tensors, the direction of each tensor (the step before the learning rate).
    """
    beta1, beta2 = betas
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denominators = torch._foreach_div(exp_avg_sqs, 1.0 - beta2 ** step_count)
    torch._foreach_sqrt_(denominators)
    torch._foreach_add_(denominators, eps)
    directions = torch._foreach_div(exp_avgs, 1.0 - beta1 ** step_count)
    torch._foreach_div_(directions, denominators)
    return directions


def apply_decoupled_step(params: list[Tensor], directions: list[Tensor], lr: float, weight_decay: float) -> None:
    """``p ← p·(1 − lr·weight_decay) − lr·direction`` in place (decoupled weight decay, then the step)."""
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, directions, alpha=-lr)


def adamw_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               step_count: int, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0) -> None:
    """One AdamW step of float32 ``params`` in place (moments too): :func:`adamw_directions`, then
    :func:`apply_decoupled_step`. ``step_count`` is 1 on the first step."""
    apply_decoupled_step(params, adamw_directions(grads, exp_avgs, exp_avg_sqs, step_count, betas, eps), lr,
                         weight_decay)
