"""``small_fc_lopt``: learned_optimization's ``AdafacMLPLOpt``, an MLP on Adafactor-style features.

Accumulators (plain EMAs, no bias correction), each with a learned decay
``1 - (1 - d0) * exp(10 * offset)`` (theta ``momentum_decays``, ``rms_decays``,
``adafactor_decays``, offsets initialised to zero):

* momentum ``m`` (0.9, 0.99, 0.999) of ``g``; ``rms`` (0.999) of ``g**2``;
* factored second moments (0.9, 0.99, 0.999) of ``g**2 + 1e-30``: for tensors with ≥ 2 dims a
  ``row`` and a ``col`` vector — means over the largest dim ``d0`` and over the second-largest
  ``d1`` (:func:`~lopt_hf.rules.features.factored_dims`); for 0-/1-D tensors a full
  ``diag`` accumulator that stands in for both.

As in the original, the rms and factored decays are clipped to [0, 1], the momentum decays are
not; and for 0-/1-D tensors fac_g uses ``rsqrt(max(v + 1e-9, 1e-9))`` while fac_mom_mult uses
``(v + 1e-6) ** -0.5``.

Features, from the accumulators *after* this step's update (28 with the defaults): g, p, m,
rms, m·rsqrt(rms+1e-6), rsqrt(rms+1e-6), fac_g (g preconditioned by the factored moments),
row, col, rsqrt(row+1e-8), rsqrt(col+1e-8), fac_mom_mult (m preconditioned likewise). Each is
normalised per tensor by its second moment (eps 1e-5); 11 tanh time features are appended and
a ReLU MLP 39→32→32→2 gives ``(direction, magnitude)``; the step is
``direction * exp(magnitude * exp_mult) * step_mult``.

Theta names are the haiku ones without the ``nn/~/`` prefix (:data:`HAIKU_NAMES`), weights
(in, out). State per tensor, decay axis first (the JAX state has it last): ``momentum``
``(3, *shape)``, ``rms`` ``(1, *shape)`` and either ``v_row`` ``(3, *shape without d0)`` and
``v_col`` ``(3, *shape without d1)``, or ``v_diag`` ``(3, *shape)``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .base import State, Theta, UpdateRule, as_step_tensor, register_rule
from .features import (DirectionMagnitudeReadout, FactoredFeatures, PieceFeatures, StreamHooks,
                       factored_accumulator_state, factored_dims, factored_features, factored_second_moments,
                       init_mlp_theta, numbered_layers, mlp_theta_shapes, normalized_mlp, squared_gradient,
                       tanh_time_features)

NUM_TIME_FEATURES = 11
DECAY_NAMES = ("momentum_decays", "rms_decays", "adafactor_decays")


def haiku_names(hidden_layers: int = 2) -> dict[str, str]:
    """learned_optimization's haiku parameter names → ours, for ``hidden_layers`` hidden layers."""
    names = {name: name for name in DECAY_NAMES}
    for layer in range(hidden_layers + 1):
        names[f"nn/~/w{layer}"] = f"w{layer}"
        names[f"nn/~/b{layer}"] = f"b{layer}"
    return names


# Haiku name → lopt_hf name for the default architecture (2 hidden layers).
HAIKU_NAMES: dict[str, str] = haiku_names(2)


def learned_decay(initial: tuple[float, ...], offset: Tensor) -> Tensor:
    """``param_to_decay(decay_to_param(initial) + offset)``, computed the way the original does."""
    initial_tensor = torch.tensor(initial, dtype=offset.dtype, device=offset.device)
    return 1.0 - torch.exp((torch.log(1.0 - initial_tensor) / 10.0 + offset) * 10.0)


def _compatible(a: int, b: int) -> bool:
    return a == b or a == 1 or b == 1


@register_rule
@dataclasses.dataclass(frozen=True)
class SmallFCLOpt(UpdateRule):
    """MLP learned optimizer with Adafactor-style features (learned_optimization AdafacMLPLOpt)."""

    name = "small_fc_lopt"

    hidden_size: int = 32
    hidden_layers: int = 2
    exp_mult: float = 1e-3
    step_mult: float = 1e-3
    initial_momentum_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    initial_rms_decays: tuple[float, ...] = (0.999,)
    initial_adafactor_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    normalization_eps: float = 1e-5

    def __post_init__(self) -> None:
        if int(self.hidden_size) <= 0 or int(self.hidden_layers) < 0:
            raise ValueError(f"hidden_size must be positive and hidden_layers non-negative, got "
                             f"{self.hidden_size}, {self.hidden_layers}")
        counts = (len(self.initial_momentum_decays), len(self.initial_rms_decays),
                  len(self.initial_adafactor_decays))
        if min(counts) == 0:
            raise ValueError("every list of initial decays needs at least one decay")
        # momentum is multiplied by functions of rms and of the factored moments, decay by decay.
        if not (_compatible(counts[0], counts[1]) and _compatible(counts[0], counts[2])):
            raise ValueError(f"rms and adafactor decay counts must equal the momentum count or be 1, got {counts}")

    @property
    def num_features(self) -> int:
        """Normalised per-element inputs (28 with the default decays)."""
        moms, rmss, facs = (len(self.initial_momentum_decays), len(self.initial_rms_decays),
                            len(self.initial_adafactor_decays))
        return 2 + moms + rmss + max(moms, rmss) + rmss + facs + 4 * facs + max(moms, facs)

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        decay_offsets: dict[str, tuple[int, ...]] = {
            "momentum_decays": (len(self.initial_momentum_decays),),
            "rms_decays": (len(self.initial_rms_decays),),
            "adafactor_decays": (len(self.initial_adafactor_decays),),
        }
        return decay_offsets | mlp_theta_shapes([self.num_features + NUM_TIME_FEATURES]
                                                + [int(self.hidden_size)] * int(self.hidden_layers) + [2])

    def init_theta(self, generator: torch.Generator | None = None) -> Theta:
        return init_mlp_theta(self.theta_shapes(), generator, "haiku")  # decay offsets start at 0

    def network_layers(self) -> list[tuple[int, int]]:
        return numbered_layers(self.theta_shapes())

    def init_state(self, param: Tensor) -> State:
        shape = tuple(param.shape)

        def zeros(count: int, of_shape: tuple[int, ...]) -> Tensor:
            return torch.zeros((count, *of_shape), dtype=torch.float32, device=param.device)

        facs = len(self.initial_adafactor_decays)
        state = {"momentum": zeros(len(self.initial_momentum_decays), shape),
                 "rms": zeros(len(self.initial_rms_decays), shape)}
        return state | factored_accumulator_state(shape, facs, zeros)

    def decays(self, theta: Theta, param: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The momentum, rms and factored decays, each ``(k, 1, …, 1)`` against its accumulator."""
        ndim = param.dim()

        def per_decay(decay: Tensor) -> Tensor:  # (k,) → (k, 1, …, 1) against (k, *shape)
            return decay.reshape(-1, *([1] * ndim))

        mom_decay = per_decay(learned_decay(self.initial_momentum_decays, theta["momentum_decays"]))
        rms_decay = per_decay(torch.clamp(learned_decay(self.initial_rms_decays, theta["rms_decays"]), 0.0, 1.0))
        fac_decay = torch.clamp(learned_decay(self.initial_adafactor_decays, theta["adafactor_decays"]), 0.0, 1.0)
        # (k, 1, …, 1) against the accumulators (k, *shape) or (k, *shape less one axis); reshaped once
        # and shared by v_row and v_col, so its meta-gradient accumulates in one place.
        dims = factored_dims(tuple(param.shape))
        return mom_decay, rms_decay, fac_decay.reshape(-1, *([1] * (ndim if dims is None else ndim - 1)))

    def update(self, theta: Theta, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
               chunk_size: int | None = None) -> tuple[Tensor, State]:
        mom_decay, rms_decay, fac_decay = self.decays(theta, param)
        momentum, rms = advance_moments(mom_decay, rms_decay, state["momentum"], state["rms"], grad)
        accumulators, fac = self.factored_moments(fac_decay, grad, state)
        step_out = self.network_step(theta, param, grad, momentum, rms, fac, step, chunk_size)
        return step_out, {"momentum": momentum, "rms": rms, **accumulators}

    def factored_moments(self, fac_decay: Tensor, grad: Tensor, state: State
                         ) -> tuple[dict[str, Tensor], FactoredFeatures]:
        """The new factored accumulators (``v_row``/``v_col`` or ``v_diag``) and their features."""

        def fac_ema(old: Tensor, new: Tensor) -> Tensor:
            return fac_decay * old + (1.0 - fac_decay) * new.unsqueeze(0)

        accumulators, factors = factored_second_moments(squared_gradient(grad), state, fac_ema)
        fac = factored_features(accumulators, factors, tuple(grad.shape), lambda v: (v + 1e-6) ** -0.5)
        return accumulators, fac

    def network_step(self, theta: Theta, param: Tensor, grad: Tensor, momentum: Tensor, rms: Tensor,
                     fac: FactoredFeatures, step: Tensor | int, chunk_size: int | None = None,
                     hooks: StreamHooks | None = None) -> Tensor:
        """The step from the new accumulators (:func:`~lopt_hf.rules.features.normalized_mlp`; ``hooks``: a
        deployment kernel's)."""
        time_features = tanh_time_features(as_step_tensor(step, param))
        features = self.features(param, grad, momentum, rms, fac)
        return normalized_mlp(theta, features, param.shape, time_features, int(self.hidden_layers) + 1,
                              DirectionMagnitudeReadout(self.exp_mult, self.step_mult),
                              chunk_size=chunk_size, eps=self.normalization_eps, hooks=hooks)

    @staticmethod
    def features(param: Tensor, grad: Tensor, momentum: Tensor, rms: Tensor, fac: FactoredFeatures) -> PieceFeatures:
        """The network's per-element features from the new accumulators, by piece (``features(index)`` of
        ``tensor[index]``, as :func:`~lopt_hf.rules.features.normalized_mlp` takes them; the order of the module
        docstring's list)."""
        return PieceFeatures(piece_features, (param, grad, momentum, rms, fac), tuple(param.shape))


def piece_features(param: Tensor, grad: Tensor, momentum: Tensor, rms: Tensor, fac: FactoredFeatures) -> list[Tensor]:
    """small_fc_lopt's 28 per-element features of a piece (:meth:`SmallFCLOpt.features`), each ``(k, *piece)``."""
    whole = (slice(None),)
    rsqrt_rms = torch.rsqrt(rms + 1e-6)
    grad_factor = fac.grad_factor_at(whole)
    return [
        grad.unsqueeze(0), param.unsqueeze(0), momentum, rms, momentum * rsqrt_rms, rsqrt_rms,
        grad * grad_factor, fac.row, fac.col, fac.rsqrt_row, fac.rsqrt_col,
        momentum * fac.momentum_factor_at(whole, grad_factor),
    ]


def advance_moments(mom_decay: Tensor, rms_decay: Tensor, momentum: Tensor, rms: Tensor,
                    grad: Tensor) -> tuple[Tensor, Tensor]:
    """The new momentum and rms EMAs of ``grad`` and ``grad²`` (decays from ``SmallFCLOpt.decays``)."""
    g = grad.unsqueeze(0)
    return mom_decay * momentum + (1.0 - mom_decay) * g, rms_decay * rms + (1.0 - rms_decay) * (g * g)
