"""Celo2's deployment execution: the rule's own arithmetic with a workspace, on stacks of tensors.

:meth:`lopt_hf.rules.celo2.Celo2.update_decay_first` is the one implementation of Celo2's math.
This kernel runs it the way a real model's optimizer step wants it (``LearnedOptimizer`` chooses
it with :func:`lopt_hf.kernels.kernel_for`):

* a :class:`Celo2Workspace` per kernel — temporaries, features and activations in buffers reused
  across calls (fresh multi-MB tensors every step cost page faults as large as their work), the
  network weights prepared once per feature order for this kernel's theta (recomputed if theta is
  changed in place), the Newton–Schulz Gram products of large matrices by symmetric blocks;
* the state of a matrix handed in as a transposed view (``LearnedOptimizer``'s ``nn.Linear``
  weights, see :mod:`lopt_hf.layout`) is kept in that memory order (column-major): the rule then
  computes on the memory as it lies, with no transposing copies;
* a stack's states are stacked after the decay axis, ``(k, B, …)``, and each tensor keeps views of
  the stacked new state, so the next step stacks them back without a copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..rules.base import State, Theta
from ..rules.celo2 import Celo2
from . import in_place
from .base import RuleKernel, register_kernel
from .buffers import BUFFER_LIMIT, Buffers


def symmetric_product(y: Tensor, base: Tensor | None = None, beta: float = 0.0, alpha: float = 1.0) -> Tensor:
    """``beta·base + alpha·y·yᵀ`` for a symmetric ``base`` (or none), by blocks of ≈ 256 rows: the
    blocks on and above the diagonal are computed, those below mirrored (k(k+1)/2 of k² products) —
    a quarter (512) to three eighths (1024) fewer flops, the same sums per entry.

    ``y`` is one matrix or a batch of them (3-D). Writes with ``out=``: no autograd, no vmap.
    """
    n = y.shape[-2]
    count = max(2, n // 256)
    bounds = [n * index // count for index in range(count + 1)]
    out = y.new_empty((*y.shape[:-2], n, n))
    product, fused = (torch.mm, torch.addmm) if y.dim() == 2 else (torch.bmm, torch.baddbmm)
    for i in range(count):
        rows = slice(bounds[i], bounds[i + 1])
        for j in range(i, count):
            cols = slice(bounds[j], bounds[j + 1])
            left, right = y[..., rows, :], y[..., cols, :].mT
            if base is None:
                product(left, right, out=out[..., rows, cols])
            else:
                fused(base[..., rows, cols], left, right, beta=beta, alpha=alpha, out=out[..., rows, cols])
            if j > i:
                out[..., cols, rows].copy_(out[..., rows, cols].mT)
    return out


class Celo2Workspace:
    """What :class:`Celo2Kernel` lends the rule (:class:`lopt_hf.rules.celo2.Workspace`)."""

    symmetric_product = staticmethod(symmetric_product)

    def __init__(self, rule: Celo2, theta: Theta, buffer_limit: int = BUFFER_LIMIT) -> None:
        self.rule = rule
        self.theta = theta
        self.buffers = Buffers(buffer_limit)
        self.weights: dict[tuple[int, ...], tuple[Tensor, Tensor, list[Tensor]]] = {}
        self.theta_versions = self._versions()

    def fits(self, numel: int) -> bool:
        return self.buffers.fits(numel)

    def in_place(self, numel: int) -> bool:
        """Stacks of :data:`~lopt_hf.kernels.in_place.IN_PLACE_MIN_NUMEL` elements or more advance their state
        in place (memory near AdamW's; below, the functional path is faster)."""
        return numel >= in_place.IN_PLACE_MIN_NUMEL

    def buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return self.buffers.get(name, shape, like)

    def network_weights(self, order: tuple[int, ...]) -> tuple[Tensor, Tensor, list[Tensor]]:
        versions = self._versions()
        if versions != self.theta_versions:  # theta was changed in place
            self.weights.clear()
            self.theta_versions = versions
        if order not in self.weights:
            self.weights[order] = self.rule.network_weights(self.theta, order)
        return self.weights[order]

    def _versions(self) -> tuple[int, ...]:
        return tuple(value._version for value in self.theta.values())


@register_kernel(Celo2)
class Celo2Kernel(RuleKernel):
    """Celo2 on stacks of same-shape tensors, with a :class:`Celo2Workspace` (see the module docstring)."""

    rule: Celo2

    def __init__(self, rule: Celo2, theta: Theta) -> None:
        super().__init__(rule, theta)
        self.workspace = Celo2Workspace(rule, theta)

    def in_place(self, numel: int) -> bool:
        """The workspace's choice (:meth:`Celo2Workspace.in_place`); under ``compile=True`` such stacks keep this
        kernel, whose peak memory stays near AdamW's."""
        return self.workspace.in_place(numel)

    def init_state(self, param: Tensor) -> State:
        """The rule's zero state; for a matrix that is a transposed view, full-size entries column-major too
        (allocated so directly: no row-major copy first, which would double the state's peak memory)."""
        if not is_column_major(param):
            return self.rule.init_state(param)
        layout = self.rule.init_state(param.to("meta"))  # Celo2's state starts at zero: shapes are all it takes
        return {key: torch.zeros((*value.shape[:-2], value.shape[-1], value.shape[-2]), dtype=value.dtype,
                                 device=param.device).mT if value.shape[1:] == param.shape
                else torch.zeros(value.shape, dtype=value.dtype, device=param.device)
                for key, value in layout.items()}

    def update_stack(self, params: Tensor, grads: Tensor, states: list[State], step: Tensor | int,
                     chunk_size: int | None = None, **kwargs: object) -> tuple[Tensor, list[State]]:
        stacked = {key: stack_states([state[key] for state in states]) for key in states[0]}
        direction, new_states = self.rule.update_decay_first(self.theta, params, grads, stacked, step, chunk_size,
                                                             workspace=self.workspace)
        # views of the stacked new state: the next step stacks them back without a copy
        return direction, [{key: value[:, index] for key, value in new_states.items()} for index in range(len(states))]


def is_column_major(x: Tensor) -> bool:
    """A matrix (or batch of them) whose last two axes lie transposed in memory."""
    return x.dim() >= 2 and x.shape[-1] > 1 and x.shape[-2] > 1 and not x.is_contiguous() and x.mT.is_contiguous()


def stack_states(tensors: list[Tensor]) -> Tensor:
    """Per-tensor state ``(k, …)`` stacked along axis 1, ``(k, B, …)``, in their memory order.

    Tensors that are already ``base[:, 0]``, ``base[:, 1]``, … of one ``base`` (what the previous
    stacked step stored) give ``base`` back without a copy; column-major matrices stay column-major.
    """
    if len(tensors) == 1:
        return tensors[0].unsqueeze(1)
    base = tensors[0]._base
    if (base is not None and base.dim() == tensors[0].dim() + 1 and base.shape[1] == len(tensors)
            and all(tensor._base is base and tensor.shape == base[:, index].shape
                    and tensor.stride() == base[:, index].stride()
                    and tensor.storage_offset() == base.storage_offset() + index * base.stride(1)
                    for index, tensor in enumerate(tensors))):
        return base
    if all(tensor.dim() >= 3 and not tensor.is_contiguous() and tensor.mT.is_contiguous() for tensor in tensors):
        return torch.stack([tensor.mT for tensor in tensors], dim=1).mT
    return torch.stack(tensors, dim=1)
