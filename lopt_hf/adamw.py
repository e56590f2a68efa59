"""AdamW, once: torch's functional foreach AdamW, for every AdamW step lopt_hf takes itself.

``LearnedOptimizer``'s ``"adamw"`` route (how Celo2's harness trains biases and embeddings) and LoLO's
Adam expert both call :func:`adamw_step`, which is ``torch.optim.adamw.adamw(foreach=True)`` — the
kernels and the arithmetic of ``torch.optim.AdamW(foreach=True)``, so a tensor on the route is trained
bit for bit as torch's AdamW would train it (``tests/optim/test_adamw.py``). (Meta-training's optimizer
of theta is ``torch.optim.AdamW`` itself.) The wrapper only takes step counts as plain ints, one per
tensor (optimizer state keeps ints, as saved checkpoints always have; torch wants tensors it
increments); callers pass float32 parameters (a copy for bf16 ones), gradients and moments, so the
moments stay float32 whatever the parameter dtype.

It does not check the values it gets: ``LearnedOptimizer`` hands them only gradients whose
elements are all below ``lopt_hf.optim.ADAMW_GRAD_LIMIT`` in magnitude (1e19), so ``g²`` and the
second moment stay finite (a larger or non-finite gradient is skipped and counted there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.adamw import adamw as torch_functional_adamw

__all__ = ["adamw_step"]


def adamw_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
               step_counts: Sequence[int], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
               eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """One AdamW step of each tensor of ``params``, in place (its moments too).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: lists of equal length, tensor ``i`` of each of one shape
            and dtype (float32 in lopt_hf).
        step_counts: the 1-based count of this step, per tensor (tensors may be at different counts).
        lr, betas, eps, weight_decay: ``torch.optim.AdamW``'s; the weight decay is decoupled
            (``p ← p·(1 − lr·weight_decay)`` before the Adam step).
    """
    if len(step_counts) != len(params):
        raise ValueError(f"{len(step_counts)} step counts for {len(params)} tensors")
    if not params:
        return
    # torch adds one to each count before using it, as torch.optim.AdamW's state does
    state_steps = [torch.tensor(float(count - 1)) for count in step_counts]
    torch_functional_adamw(params, grads, exp_avgs, exp_avg_sqs, [], state_steps, foreach=True, amsgrad=False,
                           beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay, eps=eps,
                           maximize=False)

