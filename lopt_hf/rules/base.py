"""The update-rule protocol shared by deployment (torch.optim) and meta-training (torch.func).

An update rule is a *pure* function of torch tensors. The same code serves both engines:

* ``LearnedOptimizer`` applies it to the parameter tensors of a real model, through a deployment
  kernel (``lopt_hf.kernels``: the same math executed with reused buffers, prepared weights and
  stacks of same-shape tensors; a rule without a kernel of its own runs ``update_stacked``, by
  default ``update`` on each tensor);
* the meta-trainer calls it under ``torch.func.vmap`` over a leading axis of tasks ×
  perturbations and differentiates it with respect to ``theta``.

So a rule must never mutate its inputs, never call ``.item()`` or branch on tensor *values*
(branching on shapes is fine), and must build every new tensor from its inputs.

Conventions:

* ``theta`` is a flat ``dict[str, Tensor]`` (float32) — exactly what goes into
  ``model.safetensors``.
* ``state`` is a flat ``dict[str, Tensor]`` per parameter tensor, float32.
* ``update`` returns the *step to subtract*: ``new_param = param - lr * step``. The deployed
  optimizer multiplies by its ``lr`` (default 1.0) so LR schedulers work.
* ``step`` is the 0-based iteration count *before* this update (int or a scalar tensor; under
  vmap it may be batched).
* A rule that needs the training loss declares ``needs_loss = True`` and takes it as the
  keyword ``loss`` (a scalar tensor; under vmap batched like ``step``). ``LearnedOptimizer``
  passes it to such rules only — other rules are called exactly as before — and raises a clear
  error when a step has no loss. Wrap ``update`` in a function taking the loss positionally to
  ``vmap`` over it (``vmap`` does not batch keyword arguments).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from .features import mlp_flops

Theta = dict[str, Tensor]
State = dict[str, Tensor]


class RuleConfigError(ValueError):
    """A rule name or hyper-parameter is invalid."""


class UpdateRule(ABC):
    """Base class of every learned update rule.

    Subclasses are dataclasses whose fields are the rule's hyper-parameters (JSON-serialisable
    values only); they are recorded in the artifact's ``config.json`` and passed back to the
    constructor on load.
    """

    name: ClassVar[str]
    # True: ``update`` requires the keyword ``loss`` (the training loss of the batch, a scalar).
    needs_loss: ClassVar[bool] = False
    # True: ``update_stacked`` is a batched implementation (not the default loop over the stack), so
    # ``LearnedOptimizer`` hands same-shape tensors over together; otherwise in stacks of one.
    stackable: ClassVar[bool] = False
    # True: the rule computes in JAX layout (dense kernels (in, out), conv kernels HWIO) and the
    # result depends on which axis is which; ``LearnedOptimizer`` then hands it each parameter in
    # that layout and maps the step back (see ``lopt_hf.layout``). False: tensors as given.
    layout_sensitive: ClassVar[bool] = False
    # True: a scheduled rule (see the module docstring): ``tensor_summary``, ``init_schedule_state``,
    # ``schedule`` and ``update(..., control=...)``; ``schedule_tensor_keys`` name the state entries
    # ``schedule`` (not ``update``) advances.
    scheduled: ClassVar[bool] = False
    schedule_tensor_keys: ClassVar[tuple[str, ...]] = ()
    # True: inside ``torch.compile`` the rule writes its per-element network out unit by unit whatever its
    # size (Celo2: its row/column statistics fold into per-row and per-column terms, so each element's network
    # is ~230 multiply-adds), so ``compile=True`` compiles its whole step (``lopt_hf.kernels.compiled``).
    unrolls_when_compiled: ClassVar[bool] = False

    # ----------------------------------------------------------------- hyper-parameters
    def hyperparameters(self) -> dict[str, Any]:
        """All hyper-parameters (defaults included) as JSON-serialisable values."""
        values = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict[str, Any]) -> "UpdateRule":
        """Build the rule from a config dict; unknown keys are an error."""
        known = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(hyperparameters) - set(known))
        if unknown:
            raise RuleConfigError(f"rule {cls.name!r} has no hyper-parameter(s) {unknown}; known: {sorted(known)}")
        converted = {}
        for key, value in hyperparameters.items():
            default = known[key].default
            converted[key] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
        return cls(**converted)

    # ------------------------------------------------------------------ meta-parameters
    @abstractmethod
    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every meta-parameter tensor (all float32)."""

    @abstractmethod
    def init_theta(self, generator: torch.Generator | None = None) -> Theta:
        """A fresh random ``theta`` (deterministic given the generator's seed)."""

    def network_layers(self) -> list[tuple[int, int]] | None:
        """``(in, out)`` of each layer of the rule's per-element network, in order (biases not counted);
        ``None`` for rules without one or whose network is not one plain chain of weight matrices."""
        return None

    def per_element_flops(self) -> int | None:
        """FLOPs (2 per multiply-add) of the rule's per-element network for one parameter element.
        ``None`` for rules without one."""
        layers = self.network_layers()
        return None if layers is None else mlp_flops(layers)

    def tensor_flops(self, shape: tuple[int, ...]) -> int | None:
        """FLOPs (2 per multiply-add) of the matrix products in one step of a tensor of ``shape`` (in the
        rule's layout): the per-element network over its elements, plus any whole-matrix work
        (Newton–Schulz). Summed over a model's tensors at the machine's matmul rate it is the arithmetic
        floor ``lopt-hf bench`` and ``scripts/bench_trainer.py`` compare a step with. ``None``: the rule
        does no matrix products (element-wise arithmetic only; no floor)."""
        flops = self.per_element_flops()
        return None if flops is None else flops * math.prod(shape)

    # ------------------------------------------------------------------------ per tensor
    @abstractmethod
    def init_state(self, param: Tensor) -> State:
        """Optimizer state for one parameter tensor (float32 tensors)."""

    @abstractmethod
    def update(
        self,
        theta: Theta,
        param: Tensor,
        grad: Tensor,
        state: State,
        step: Tensor | int,
        chunk_size: int | None = None,
    ) -> tuple[Tensor, State]:
        """One step for one tensor: returns ``(step_to_subtract, new_state)``.

        ``chunk_size`` bounds how many elements go through the per-element network at once
        (deployment memory/speed); ``None`` processes the tensor whole (what ``vmap`` wants).
        It never changes the result beyond float rounding.
        """

    def update_stacked(self, theta: Theta, params: Tensor, grads: Tensor, states: State, step: Tensor | int,
                       chunk_size: int | None = None, **kwargs: Any) -> tuple[Tensor, State]:
        """:meth:`update` of ``B`` independent same-shape tensors stacked on axis 0: ``params`` / ``grads``
        ``(B, *shape)``, every state tensor ``(B, …)`` (tensor ``i``'s state is ``value[i]``).
        Returns the ``(B, *shape)`` steps and the new states, stacked alike; ``kwargs`` go to
        :meth:`update` (``loss`` for rules with ``needs_loss``; ``control`` of a scheduled rule is
        stacked ``(B, C)``, and tensor ``i`` gets row ``i``).

        This default is the per-tensor update over the stack, one tensor at a time; a rule with a
        batched implementation overrides it (and sets ``stackable``). It must equal this loop.
        """
        control = kwargs.pop("control", None)

        def row_kwargs(index: int) -> dict[str, Any]:
            return kwargs if control is None else {**kwargs, "control": control[index]}

        results = [self.update(theta, params[index], grads[index], {key: value[index] for key, value in states.items()},
                               step, chunk_size, **row_kwargs(index)) for index in range(params.shape[0])]
        if len(results) == 1:  # a stack of one: views, no copies
            direction, new_state = results[0]
            return direction.unsqueeze(0), {key: value.unsqueeze(0) for key, value in new_state.items()}
        return (torch.stack([direction for direction, _ in results]),
                {key: torch.stack([new_state[key] for _, new_state in results]) for key in results[0][1]})


_REGISTRY: dict[str, type[UpdateRule]] = {}


def register_rule(cls: type[UpdateRule]) -> type[UpdateRule]:
    """Class decorator: make ``cls`` loadable by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuleConfigError(f"rule name {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_rules() -> list[str]:
    """Names of all registered rules."""
    return sorted(_REGISTRY)


def rule_class(name: str) -> type[UpdateRule]:
    """The rule class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RuleConfigError(f"unknown rule {name!r}; available rules: {available_rules()}") from None


def build_rule(name: str, **hyperparameters: Any) -> UpdateRule:
    """Instantiate the rule ``name`` with the given hyper-parameters (others default)."""
    return rule_class(name).from_hyperparameters(hyperparameters)


def as_step_tensor(step: Tensor | int, like: Tensor) -> Tensor:
    """The iteration count as a float32 scalar tensor on ``like``'s device (vmap-friendly)."""
    if isinstance(step, Tensor):
        return step.to(device=like.device, dtype=torch.float32)
    return torch.tensor(float(step), device=like.device, dtype=torch.float32)
