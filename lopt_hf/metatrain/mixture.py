"""Several task families in one meta-training run: one estimator per family, task slots dealt in turn.

A learned optimizer meant for MLPs, CNNs and language models alike has to see all of them while it is
meta-trained. :class:`TaskMixture` holds one meta-gradient estimator per family (each with its own
vectorised inner trainer, since the families' parameter shapes differ) and presents them to the outer
loop as one :class:`~lopt_hf.metatrain.estimators.MetaGradientEstimator`: global task slot ``i`` belongs
to family ``i mod n``, so every process holding ``n`` consecutive slots trains every family. The
meta-gradient is the sum over all slots (the outer loop divides by the slot count), the families'
meta-losses are each normalised by their own scale (a uniform guess's loss), so no family dominates
by units alone.

State keys are prefixed ``family<k>/``. Statistics are the slot-weighted means of the families' (counts
are summed) plus ``meta_loss/<k>``, family ``k``'s mean meta-loss on this process (0 where a process
holds none of its slots).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .estimators import EstimateResult, EstimatorState, MetaGradientEstimator, Theta

__all__ = ["TaskMixture", "family_of_slot"]

_COUNTS = ("nonfinite_losses", "inner_steps")  # statistics that add up over slots; the others are means


def family_of_slot(task_id: int, num_families: int) -> int:
    """The family that global task slot ``task_id`` trains: slots are dealt to the families in turn."""
    return task_id % num_families


class TaskMixture:
    """One :class:`MetaGradientEstimator` over several task families (one estimator each, in order)."""

    def __init__(self, estimators: Sequence[MetaGradientEstimator]) -> None:
        if len(estimators) < 2:
            raise ValueError(f"a task mixture needs at least two estimators, got {len(estimators)}")
        self.estimators = list(estimators)

    def _slots(self, task_ids: Sequence[int]) -> list[list[int]]:
        """This call's slots per family (a family may have none on a process with few slots)."""
        slots: list[list[int]] = [[] for _ in self.estimators]
        for task_id in task_ids:
            slots[family_of_slot(int(task_id), len(self.estimators))].append(int(task_id))
        return slots

    @staticmethod
    def _own(state: EstimatorState, family: int) -> EstimatorState:
        prefix = f"family{family}/"
        return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}

    def init_state(self, theta: Theta, task_ids: Sequence[int], outer_step: int) -> EstimatorState:
        state: EstimatorState = {}
        for family, (estimator, ids) in enumerate(zip(self.estimators, self._slots(task_ids))):
            if ids:
                own = estimator.init_state(theta, ids, outer_step)
                state.update({f"family{family}/{key}": value for key, value in own.items()})
        return state

    def estimate(self, theta: Theta, state: EstimatorState, task_ids: Sequence[int],
                 outer_step: int) -> EstimateResult:
        grad_sum: dict[str, Tensor] = {name: torch.zeros_like(value) for name, value in theta.items()}
        meta_loss_sum, num_tasks, new_state = 0.0, 0, {}
        weighted: dict[str, float] = {}
        per_family: dict[str, float] = {}
        for family, (estimator, ids) in enumerate(zip(self.estimators, self._slots(task_ids))):
            per_family[f"meta_loss/{family}"] = 0.0
            if not ids:
                continue
            result = estimator.estimate(theta, self._own(state, family), ids, outer_step)
            for name, value in result.grad_sum.items():
                grad_sum[name] = grad_sum[name] + value.to(grad_sum[name].device)
            family_loss = float(result.meta_loss_sum)
            meta_loss_sum += family_loss
            num_tasks += result.num_tasks
            new_state.update({f"family{family}/{key}": value for key, value in result.new_state.items()})
            for key, value in result.stats.items():
                share = 1.0 if key in _COUNTS else result.num_tasks
                weighted[key] = weighted.get(key, 0.0) + share * float(value)
            per_family[f"meta_loss/{family}"] = family_loss / result.num_tasks
        stats = {key: value if key in _COUNTS else value / max(num_tasks, 1) for key, value in weighted.items()}
        return EstimateResult(grad_sum=grad_sum, meta_loss_sum=torch.tensor(meta_loss_sum), num_tasks=num_tasks,
                              new_state=new_state, stats={**stats, **per_family})
