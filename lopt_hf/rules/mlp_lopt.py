"""``mlp_lopt``: learned_optimization's ``MLPLOpt`` (a.k.a. LOLv2), a per-parameter MLP.

Each element sees its gradient, its value and six momenta (decays 0.1 … 0.9999, plain EMAs
updated before the features are built). These 8 features are normalised per tensor by their
second moment, ``x * rsqrt(1e-5 + mean(x**2))``; 11 tanh time features of the iteration are
appended (not normalised) and a ReLU MLP 19→32→32→2 gives ``(direction, magnitude)``; the
step is ``direction * exp(magnitude * exp_mult) * step_mult``.

Theta is haiku's ``hk.nets.MLP`` under flat names: ``mlp/~/linear_i/{w,b}`` → ``w{i}``,
``b{i}``, weights in (in, out) layout, so a JAX checkpoint converts by renaming
(:data:`HAIKU_NAMES`). State per tensor: ``momentum`` of shape ``(6, *param.shape)`` (decay
axis first; the JAX state has it last).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import State, Theta, UpdateRule, as_step_tensor, register_rule
from .features import (DirectionMagnitudeReadout, PieceFeatures, StreamHooks, init_mlp_theta, numbered_layers,
                       mlp_theta_shapes, normalized_mlp, tanh_time_features)

NUM_TIME_FEATURES = 11


def haiku_names(hidden_layers: int = 2) -> dict[str, str]:
    """learned_optimization's haiku parameter names → ours, for ``hidden_layers`` hidden layers."""
    names = {}
    for layer in range(hidden_layers + 1):
        names[f"mlp/~/linear_{layer}/w"] = f"w{layer}"
        names[f"mlp/~/linear_{layer}/b"] = f"b{layer}"
    return names


# Haiku name → lopt_hf name for the default architecture (2 hidden layers).
HAIKU_NAMES: dict[str, str] = haiku_names(2)


@register_rule
@dataclasses.dataclass(frozen=True)
class MLPLOpt(UpdateRule):
    """Per-parameter MLP on gradient, parameter and six momenta (learned_optimization MLPLOpt)."""

    name = "mlp_lopt"

    hidden_size: int = 32
    hidden_layers: int = 2
    exp_mult: float = 1e-3
    step_mult: float = 1e-3
    momentum_decays: tuple[float, ...] = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
    normalization_eps: float = 1e-5

    def __post_init__(self) -> None:
        if int(self.hidden_size) <= 0 or int(self.hidden_layers) < 0:
            raise ValueError(f"hidden_size must be positive and hidden_layers non-negative, got "
                             f"{self.hidden_size}, {self.hidden_layers}")
        if not self.momentum_decays:
            raise ValueError("momentum_decays must not be empty")

    @property
    def num_features(self) -> int:
        """Normalised per-element inputs: gradient, parameter, one per momentum."""
        return 2 + len(self.momentum_decays)

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        return mlp_theta_shapes([self.num_features + NUM_TIME_FEATURES]
                                + [int(self.hidden_size)] * int(self.hidden_layers) + [2])

    def init_theta(self, generator: torch.Generator | None = None) -> Theta:
        return init_mlp_theta(self.theta_shapes(), generator, "haiku")

    def network_layers(self) -> list[tuple[int, int]]:
        return numbered_layers(self.theta_shapes())

    def init_state(self, param: Tensor) -> State:
        return {"momentum": torch.zeros((len(self.momentum_decays), *param.shape), dtype=torch.float32,
                                        device=param.device)}

    def decays(self, like: Tensor) -> Tensor:
        """The momentum decays ``(k, 1, …, 1)`` against the momentum ``(k, *like.shape)``."""
        decays = torch.tensor(self.momentum_decays, dtype=torch.float32, device=like.device)
        return decays.reshape(-1, *([1] * like.dim()))

    def update(self, theta: Theta, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
               chunk_size: int | None = None) -> tuple[Tensor, State]:
        momentum = advance_momentum(self.decays(param), state["momentum"], grad)
        step_out = self.network_step(theta, param, grad, momentum, step, chunk_size)
        return step_out, {"momentum": momentum}

    @staticmethod
    def features(param: Tensor, grad: Tensor, momentum: Tensor) -> PieceFeatures:
        """The network's per-element features from the new ``momentum``, by piece (``features(index)`` of
        ``tensor[index]``, as :func:`~lopt_hf.rules.features.normalized_mlp` takes them): ``g``, ``p``, the momenta."""
        return PieceFeatures(piece_features, (grad, param, momentum), tuple(param.shape))

    def network_step(self, theta: Theta, param: Tensor, grad: Tensor, momentum: Tensor, step: Tensor | int,
                     chunk_size: int | None = None, hooks: StreamHooks | None = None) -> Tensor:
        """The step from the new ``momentum`` (:func:`~lopt_hf.rules.features.normalized_mlp`; ``hooks``: a
        deployment kernel's)."""

        features = self.features(param, grad, momentum)
        time_features = tanh_time_features(as_step_tensor(step, param))
        return normalized_mlp(theta, features, param.shape, time_features, int(self.hidden_layers) + 1,
                              DirectionMagnitudeReadout(self.exp_mult, self.step_mult),
                              chunk_size=chunk_size, eps=self.normalization_eps, hooks=hooks)


def piece_features(grad: Tensor, param: Tensor, momentum: Tensor) -> list[Tensor]:
    """mlp_lopt's per-element features of a piece: ``g``, ``p`` and the momenta (``(k, *piece)``)."""
    return [grad.unsqueeze(0), param.unsqueeze(0), momentum]


def advance_momentum(decays: Tensor, momentum: Tensor, grad: Tensor) -> Tensor:
    """The new momenta ``d·m + (1 − d)·g`` (``momentum`` ``(k, *grad.shape)``; ``decays`` from
    ``MLPLOpt.decays``)."""
    return decays * momentum + (1.0 - decays) * grad.unsqueeze(0)
