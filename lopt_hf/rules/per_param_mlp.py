"""``per_param_mlp``: the per-parameter MLP learned optimizer of the learned-optimizers tutorial.

Each element sees ``[param, momentum, grad]`` (momentum = EMA of the gradient, updated before
the features are built, no normalisation); an MLP maps them to ``(a, b)`` and the step is
``a * step_mult * exp(b * exp_mult)`` (0.01 and 0.01 in the tutorial).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import State, Theta, UpdateRule, register_rule
from .features import (ElementMajorWeights, activation_fn, chunk_indices, ema, element_major_weights, init_mlp_theta,
                       numbered_layers, mlp_theta_shapes, streamed_mlp, writes_skinny_products, written_out_mlp)

NUM_INPUTS = 3  # param, momentum, grad


@register_rule
@dataclasses.dataclass(frozen=True)
class PerParamMLP(UpdateRule):
    """The tutorial's per-parameter MLP on ``[param, momentum, grad]``."""

    name = "per_param_mlp"

    hidden_sizes: tuple[int, ...] = (64,)
    activation: str = "relu"
    momentum_decay: float = 0.9
    step_mult: float = 0.01
    exp_mult: float = 0.01

    def __post_init__(self) -> None:
        activation_fn(self.activation)  # validate early
        if not self.hidden_sizes or any(int(size) <= 0 for size in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive integers, got {self.hidden_sizes}")

    @property
    def _layer_sizes(self) -> list[int]:
        return [NUM_INPUTS, *map(int, self.hidden_sizes), 2]

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        return mlp_theta_shapes(self._layer_sizes)

    def init_theta(self, generator: torch.Generator | None = None) -> Theta:
        # The tutorial draws weights from a unit normal (no fan-in scaling) and zero biases.
        return init_mlp_theta(self.theta_shapes(), generator, "normal")

    def network_layers(self) -> list[tuple[int, int]]:
        return numbered_layers(self.theta_shapes())

    def init_state(self, param: Tensor) -> State:
        return {"momentum": torch.zeros_like(param, dtype=torch.float32)}

    def network(self, theta: Theta) -> ElementMajorWeights:
        """The MLP as :func:`~lopt_hf.rules.features.element_major_weights` (input rows ``[p, m, g, 1]``)."""
        num_layers = len(self._layer_sizes) - 1
        return element_major_weights([(theta[f"w{layer}"], theta[f"b{layer}"]) for layer in range(num_layers)])

    def readout(self, h: Tensor) -> Tensor:
        """The step ``a * step_mult * exp(b * exp_mult)`` from the network's ``(2, n)`` output."""
        return h[0] * self.step_mult * torch.exp(h[1] * self.exp_mult)

    def update(self, theta: Theta, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
               chunk_size: int | None = None) -> tuple[Tensor, State]:
        momentum = ema(state["momentum"], grad, self.momentum_decay)
        weights = self.network(theta)
        flat_p, flat_m, flat_g = param.reshape(-1), momentum.reshape(-1), grad.reshape(-1)
        if writes_skinny_products():  # compiling: the network written out on the inputs, no feature matrix
            h = written_out_mlp([flat_p, flat_m, flat_g], weights, self.activation)
            return self.readout(h).reshape(param.shape), {"momentum": momentum}
        in_place = not torch.is_grad_enabled()  # deployment: rectify activations in place

        def features(rows: tuple) -> Tensor:
            return feature_matrix(flat_p[rows], flat_m[rows], flat_g[rows])

        step_out = streamed_mlp(chunk_indices(flat_p.shape, chunk_size), features, weights, self.activation,
                                self.readout, in_place=in_place)
        return step_out.reshape(param.shape), {"momentum": momentum}


def feature_matrix(param: Tensor, momentum: Tensor, grad: Tensor) -> Tensor:
    """``[p, m, g, 1]`` per element, ``(4, n)`` for flat ``(n,)`` inputs; the trailing 1 carries the first
    layer's bias (see :func:`~lopt_hf.rules.features.element_major_weights`)."""
    return torch.stack([param, momentum, grad, torch.ones_like(param)])
