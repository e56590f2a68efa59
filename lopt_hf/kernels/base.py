"""The kernel protocol and the kernel of every rule without its own: ``rule.update_stacked``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..rules.base import State, Theta, UpdateRule

if TYPE_CHECKING:
    from .compiled import Compiler

# Tensors below this size are handed to the rule as contiguous copies if they are views in another memory order
# (:func:`contiguous_below`; the in-place kernels' threshold, so that large tensors stay near AdamW's memory).
CONTIGUOUS_BELOW = 1 << 22


def contiguous_below(tensor: Tensor, numel: int | None = None) -> Tensor:
    """``tensor`` as a contiguous tensor if each of its stacked tensors has fewer than ``numel`` elements
    (default :data:`CONTIGUOUS_BELOW`), else as it is.

    A layout-sensitive rule (Celo, VeLO) gets an ``nn.Linear`` weight and its gradient as transposed views
    (:mod:`lopt_hf.layout`); the pieces of such a view are strided and every element-wise pass over them is slow
    (Celo's in-place kernel on the benchmark MLP: 170 against 140 ms per step with contiguous copies). Every
    kernel that computes in the rule's layout hands its rule contiguous tensors below :data:`CONTIGUOUS_BELOW`
    elements, so the paths agree bit for bit (a reduction over a strided view may sum in another order); larger
    tensors keep their views: two full-size copies would cost more memory than the in-place pieces save.
    """
    return tensor.contiguous() if tensor[0].numel() < (CONTIGUOUS_BELOW if numel is None else numel) else tensor


class RuleKernel:
    """Deployment execution of ``rule`` with fixed meta-parameters ``theta`` (on one device).

    ``stacks``: whether same-shape tensors should be handed over together (the rule's
    ``update_stacked`` is batched, ``rule.stackable``); otherwise the optimizer hands stacks of one.
    """

    def __init__(self, rule: UpdateRule, theta: Theta) -> None:
        self.rule = rule
        self.theta = theta

    @property
    def stacks(self) -> bool:
        return self.rule.stackable

    def init_state(self, param: Tensor) -> State:
        """The state of one tensor (as the rule sees it: in the rule's layout)."""
        return self.rule.init_state(param)

    @property
    def fused_subtract(self) -> bool:
        """How :meth:`apply_step` rounds: in one fused multiply-subtract (True), or ``lr·direction``
        rounded first (False). The two differ in the last bit when ``lr != 1``, and artifacts' results
        must not change with the engine's internals: rules batched from the start (Celo2) fuse, rules
        that were deployed one tensor at a time round first, also once they stack."""
        return self.stacks

    def apply_step(self, params: Tensor, direction: Tensor, lr: float) -> None:
        """``params -= lr·direction`` in place (float32), rounded as this rule's deployment always was
        (:attr:`fused_subtract`; at ``lr == 1`` the two agree, ``1·direction`` being exact)."""
        if self.fused_subtract or lr == 1.0:
            params.sub_(direction, alpha=lr)
        else:
            params.sub_(lr * direction)

    def tensor_summary(self, param: Tensor, grad: Tensor, state: State) -> Tensor:
        """A scheduled rule's per-tensor scheduler inputs (``rule.tensor_summary``), in the rule's layout."""
        return self.rule.tensor_summary(param, grad, state)

    def update_stack(self, params: Tensor, grads: Tensor, states: list[State], step: Tensor | int,
                     chunk_size: int | None = None, **kwargs: Any) -> tuple[Tensor, list[State]]:
        """Steps of ``B`` same-shape tensors ``params`` / ``grads`` ``(B, *shape)`` with their own states.

        Returns the ``(B, *shape)`` steps and each tensor's new state. ``kwargs``: the rule's keywords
        (``loss`` for rules with ``needs_loss``).
        """
        params, grads = contiguous_below(params), contiguous_below(grads)
        direction, new_states = self.rule.update_stacked(self.theta, params, grads, stack_states(states), step,
                                                         chunk_size, **kwargs)
        return direction, unstack_states(new_states, len(states))

    def in_place(self, numel: int) -> bool:
        """Whether a stack of ``numel`` elements per tensor advances its state in place, piece by piece (memory
        near AdamW's) rather than computing it whole; the base kernel never does."""
        return False

    # Whether :meth:`compile_parts` compiles anything (``LearnedOptimizer(compile=True)`` for a rule whose whole
    # step does not compile, :func:`~lopt_hf.kernels.compiled.compiles`).
    compiled_parts = False
    # What compiles this kernel's step or parts of it under compile=True (it says whether compiling failed).
    compiler: Compiler | None = None

    def compile_parts(self, compiler: Compiler) -> None:
        """Run the parts of the step that pay for it through ``compiler.compile`` (``torch.compile`` with an eager
        fallback) from now on; the base kernel has none (:attr:`compiled_parts`)."""
        self.compiler = compiler


_KERNELS: dict[type[UpdateRule], type[RuleKernel]] = {}


def register_kernel(rule_class: type[UpdateRule]):  # noqa: ANN201  (a class decorator)
    """Class decorator: the kernel of ``rule_class`` and its subclasses."""

    def register(kernel_class: type[RuleKernel]) -> type[RuleKernel]:
        _KERNELS[rule_class] = kernel_class
        return kernel_class

    return register


def kernel_class(rule: UpdateRule) -> type[RuleKernel]:
    """The class of ``rule``'s deployment kernel (the most specific registered one, else :class:`RuleKernel`)."""
    for cls in type(rule).__mro__:
        if cls in _KERNELS:
            return _KERNELS[cls]
    return RuleKernel


def kernel_for(rule: UpdateRule, theta: Theta) -> RuleKernel:
    """The deployment kernel of ``rule`` with ``theta`` (:func:`kernel_class`)."""
    return kernel_class(rule)(rule, theta)


def stack_tensors(tensors: list[Tensor]) -> Tensor:
    """``tensors`` (one shape) stacked along a new leading axis; a view for a single tensor."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def stack_states(states: list[State]) -> State:
    """Per-tensor states (one key set) as one state of ``(B, …)`` tensors."""
    return {key: stack_tensors([state[key] for state in states]) for key in states[0]}


def unstack_states(stacked: State, count: int) -> list[State]:
    """Tensor ``i``'s state from a stacked one: views ``value[i]``."""
    return [{key: value[index] for key, value in stacked.items()} for index in range(count)]
