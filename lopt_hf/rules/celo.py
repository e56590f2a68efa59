"""``celo`` and ``celo_adam``: Celo's learned scheduler driving a learned MLP rule or Adam.

Celo (Moudgil, Knyazev, Lajoie, Belilovsky, "Celo: Training Versatile Learned Optimizers on a
Compute Diet", TMLR 2025, arXiv 2501.12670, MIT licence) ports of amoudgl/celo
``celo/optimizers/celo.py`` and ``celo_adam.py`` that reproduce the original's reference vectors
with the authors' published meta-trained weights.

Both rules are *scheduled* (:mod:`lopt_hf.rules.scheduler`): once per step an LSTM over every
tensor of the model reads the fraction of training done and the loss statistics and emits a
per-tensor ``lr_mult``. The scheduler sees no per-tensor statistics here (unless ``celo_adam``'s
``tensor_features``), so every tensor gets the same ``lr_mult`` (each keeps its own LSTM row, as in
the original). Gradients are clipped to
±``grad_clip`` before anything else.

``celo`` — per element, plain EMAs without bias correction (momentum 0.9/0.99/0.999, rms 0.999,
Adafactor-style factored second moments 0.9/0.99/0.999 of ``g² + 1e-30``) feed 14 feature groups
(30 numbers): g, clip(g, ±0.1), p, m×3, rms, m·rsqrt(rms+1e-6)×3, rsqrt(rms+1e-6), fac_g×3,
g·rsqrt(rms+1e-6), row×3, col×3, rsqrt(row+1e-8)×3, rsqrt(col+1e-8)×3, fac_mom_mult×3 — tensors
with fewer than two dims use their full second-moment vector ``v`` for row and col, and
``m·v^-½`` for fac_mom_mult. Each feature is normalised over the whole tensor (eps 1e-5); a ReLU
MLP 30 → 4 → 4 → 3 with one first-layer matrix per group (``w0__0`` … ``w0__13``) gives
``direction`` and ``magnitude``; the step is
``direction · exp(0.001·magnitude) · 0.001 · rms(p) · lr_mult`` with ``rms(p) = √(mean(p²)+1e-9)``
(the published weights were meta-trained with this "param scale" factor; ``param_scale_mult``).
``param_inits > 1`` keeps that many per-element networks, mixed per tensor by the scheduler's
softmax controls (the published Celo has one).

``celo_adam`` — Adam (momentum 0.9, rms 0.999, bias-corrected with the tensor's step count,
eps 1e-8) at learning rate ``0.001 · lr_mult``: ``m̂ / (eps + √(v̂ + 1e-10))``. The original also
keeps factored accumulators that its step never reads; they are not kept here.
``orthogonalize=True`` (lopt_hf's extension, Celo2's "Newton–Schulz for matrices" on Celo-Adam) replaces
the step of every tensor with ≥ 2 dims by its Newton–Schulz orthogonalisation at the same RMS
(:func:`orthogonalized`); 1-D tensors keep Adam's step.
``lr_schedule`` (both rules): ``"learned"`` (the original), or a fixed schedule in place of the scheduler's
``lr_mult`` (:data:`~lopt_hf.rules.scheduler.LR_SCHEDULES`): Celo's phase 1 (``"constant"``) or warmup +
cosine.
``tensor_features=True`` (lopt_hf's extension, not in the original) gives its scheduler VeLO's
per-tensor inputs (:func:`~lopt_hf.rules.scheduler.accumulator_summary` of Adam's moments: 8
numbers per tensor), so ``lr_mult`` can differ between tensors; a theta meta-trained without them
starts such a rule with zero weights on them (:meth:`ScheduledRule.with_summary_inputs`), i.e. as
the published optimizer.

Theta keeps the original haiku names (``ff_mod_stack/~/w0__0`` …, ``rnn_params/…``,
``lstm_init_state/…``) with the leading ``param_inits`` axis of the per-element networks, so a
published ``theta.state`` converts by flattening its tree. Computation is in JAX layout
(``layout_sensitive``): the factored statistics pick the two largest axes and, on ties, which one
counts as larger depends on the axis order.

State per tensor, decay axis first: ``momentum``, ``rms`` and (``celo``) ``v_row`` / ``v_col`` or
``v_diag``, plus the tensor's LSTM rows ``lstm_hidden`` / ``lstm_cell``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from .base import State, Theta, as_step_tensor, register_rule
from .features import (DirectionMagnitudeReadout, FactoredFeatures, StreamHooks, factored_accumulator_state,
                       factored_features, factored_second_moments, mlp_flops, normalized_mlp, squared_gradient,
                       truncated_normal_init)
from .scheduler import RANK_SLOTS, ScheduledRule, accumulator_summary

FF = "ff_mod_stack/~/"
NUM_GROUPS = 14


def _zeros_like_decays(param: Tensor) -> Callable[[int, tuple[int, ...]], Tensor]:
    def zeros(count: int, of_shape: tuple[int, ...]) -> Tensor:
        return torch.zeros((count, *of_shape), dtype=torch.float32, device=param.device)

    return zeros


def param_rms(param: Tensor) -> Tensor:
    """``rms(p) = √(mean(p²) + 1e-9)``: the step's factor with ``param_scale_mult``."""
    return torch.sqrt(torch.mean(torch.square(param)) + 1e-9)


def orthogonalized(direction: Tensor) -> Tensor:
    """``direction`` (≥ 2 dims, seen as ``(shape[0], rest)``) orthogonalised by Newton–Schulz, at its own RMS.

    Celo2's and Muon's quintic iteration (:func:`~lopt_hf.rules.celo2.newton_schulz`, 5 iterations,
    Celo2's coefficients) makes every singular value of the matrix about 1; rescaling to the input's
    root-mean-square keeps the step's size and changes only its direction, so a scheduler meta-trained for
    Adam's step (published Celo-Adam) starts from steps of the size it knows.
    """
    from .celo2 import Celo2, newton_schulz

    matrix = direction.reshape(direction.shape[0], -1)
    ortho = newton_schulz(matrix, tuple(Celo2.ns_coeffs), int(Celo2.ns_iters), Celo2.ns_eps)
    scale = torch.sqrt(torch.mean(torch.square(matrix)) / (torch.mean(torch.square(ortho)) + 1e-30))
    return (ortho * scale).reshape(direction.shape)


def _ema(decays: tuple[float, ...], old: Tensor, new: Tensor) -> Tensor:
    """``d·old + (1 − d)·new`` per decay (decay axis first; ``new`` broadcast over it)."""
    d = torch.tensor(decays, dtype=torch.float32, device=old.device).reshape(-1, *([1] * (old.dim() - 1)))
    return d * old + (1.0 - d) * new.unsqueeze(0)


class ClippedGradient:
    """Celo and Celo-Adam clip the gradient to ±``grad_clip`` before anything else."""

    grad_clip: float

    def clipped(self, grad: Tensor) -> Tensor:
        """The gradient clipped to ±``grad_clip``: what every statistic reads (element-wise)."""
        return torch.clamp(grad, -self.grad_clip, self.grad_clip)


@register_rule
@dataclasses.dataclass(frozen=True)
class Celo(ClippedGradient, ScheduledRule):
    """Celo: a learned LSTM scheduler steering a learned per-element MLP (published weights: ``amoudgl/celo``)."""

    name: ClassVar[str] = "celo"
    layout_sensitive: ClassVar[bool] = True

    lstm_hidden_size: int = 64
    ff_hidden_size: int = 4
    ff_hidden_layers: int = 2
    param_inits: int = 1
    momentum_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    rms_decays: tuple[float, ...] = (0.999,)
    adafactor_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    grad_clip: float = 1000.0
    exp_mult: float = 0.001
    step_mult: float = 0.001
    param_scale_mult: bool = True
    normalization_eps: float = 1e-5
    lr_schedule: str = "learned"

    def __post_init__(self) -> None:
        self.check_lr_schedule()
        for field in ("lstm_hidden_size", "ff_hidden_size", "param_inits"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"{field} must be a positive integer, got {getattr(self, field)!r}")
        if int(self.ff_hidden_layers) < 1:
            raise ValueError(f"ff_hidden_layers must be >= 1, got {self.ff_hidden_layers!r}")
        moms, rmss, facs = len(self.momentum_decays), len(self.rms_decays), len(self.adafactor_decays)
        if rmss != 1 or moms != facs or moms < 1:
            raise ValueError("celo needs one rms decay and as many adafactor as momentum decays, got "
                             f"{moms} momentum, {rmss} rms, {facs} adafactor")

    @property
    def num_mixed_networks(self) -> int:
        return int(self.param_inits)

    def group_sizes(self) -> tuple[int, ...]:
        """Numbers in each of the 14 feature groups (30 with the default decays)."""
        k = len(self.momentum_decays)
        return (1, 1, 1, k, 1, k, 1, k, 1, k, k, k, k, k)

    # ----------------------------------------------------------------------------- theta
    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        inits, hidden = int(self.param_inits), int(self.ff_hidden_size)
        shapes = {f"{FF}w0__{i}": (inits, size, hidden) for i, size in enumerate(self.group_sizes())}
        widths = [hidden] * int(self.ff_hidden_layers) + [3]
        for layer, width in enumerate(widths):
            if layer:
                shapes[f"{FF}w{layer}"] = (inits, widths[layer - 1], width)
            shapes[f"{FF}b{layer}"] = (inits, width)
        return shapes | self.schedule_theta_shapes()

    def init_theta(self, generator: torch.Generator | None = None) -> Theta:
        theta = self.init_schedule_theta(generator)
        fan_in = sum(self.group_sizes())
        for key, shape in self.theta_shapes().items():
            if not key.startswith(FF):
                continue
            if "/~/b" in key:
                theta[key] = torch.zeros(shape, dtype=torch.float32)
            else:  # haiku: std 1/√fan_in of the whole first layer for every per-group matrix
                std = 1.0 / math.sqrt(fan_in if "/~/w0__" in key else shape[1])
                theta[key] = truncated_normal_init(shape, std, generator)
        return theta

    # ----------------------------------------------------------------------------- state
    def per_element_flops(self) -> int:
        # the mixed network (averaged once per tensor); the scheduler runs once per tensor, not per element
        return mlp_flops(shape for key, shape in self.theta_shapes().items() if key.startswith(f"{FF}w"))

    def init_state(self, param: Tensor) -> State:
        shape = tuple(param.shape) if param.dim() > 0 else (1,)
        zeros = _zeros_like_decays(param)
        state = {"momentum": zeros(len(self.momentum_decays), shape), "rms": zeros(1, shape)}
        return state | factored_accumulator_state(shape, len(self.adafactor_decays), zeros) | self.lstm_state(param)

    # ---------------------------------------------------------------------------- update
    def network_weights(self, theta: Theta, mixing: Tensor) -> Theta:
        """The per-element network of one tensor: the ``param_inits`` networks averaged with weights
        ``mixing`` (the original's ``mean(stack · c)``), the first layer's group matrices stacked."""

        def mix(value: Tensor) -> Tensor:
            return torch.mean(value * mixing.reshape(-1, *([1] * (value.dim() - 1))), dim=0)

        weights = {"w0": torch.cat([mix(theta[f"{FF}w0__{i}"]) for i in range(NUM_GROUPS)])}
        for layer in range(int(self.ff_hidden_layers) + 1):
            if layer:
                weights[f"w{layer}"] = mix(theta[f"{FF}w{layer}"])
            weights[f"b{layer}"] = mix(theta[f"{FF}b{layer}"])
        return weights

    def update(self, theta: Theta, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
               chunk_size: int | None = None, *, control: Tensor) -> tuple[Tensor, State]:
        shape = param.shape
        p = param.reshape(1) if param.dim() == 0 else param
        g = self.clipped(grad.reshape(p.shape))
        momentum, rms = self.advance_moments(state["momentum"], state["rms"], g)
        accumulators, fac = self.factored_moments(g, state)
        new_state = {"momentum": momentum, "rms": rms, **accumulators}
        direction = self.network_step(theta, p, g, momentum, rms, fac, control, chunk_size)
        return (direction * self.step_scale(p, control)).reshape(shape), new_state

    def advance_moments(self, momentum: Tensor, rms: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """The new momentum and rms EMAs (decay axis first) of the clipped gradient ``g`` and ``g²``."""
        return _ema(self.momentum_decays, momentum, g), _ema(self.rms_decays, rms, g * g)

    def factored_moments(self, g: Tensor, state: State) -> tuple[dict[str, Tensor], FactoredFeatures]:
        """The new factored accumulators of ``g² + 1e-30`` and their per-element features."""
        accumulators, factors = factored_second_moments(squared_gradient(g), state,
                                                        lambda old, new: _ema(self.adafactor_decays, old, new))
        return accumulators, factored_features(accumulators, factors, tuple(g.shape), lambda v: v ** -0.5)

    def network_step(self, theta: Theta, p: Tensor, g: Tensor, momentum: Tensor, rms: Tensor, fac: FactoredFeatures,
                     control: Tensor, chunk_size: int | None = None, hooks: StreamHooks | None = None) -> Tensor:
        """The mixed per-element network's direction of ``p`` (at least 1-D) from the new accumulators, before
        :meth:`step_scale` (:func:`~lopt_hf.rules.features.normalized_mlp`; ``hooks``: a deployment kernel's)."""

        def features(index: tuple) -> list[Tensor]:
            at = (slice(None), *index)
            g_i, m_i = g[index].unsqueeze(0), momentum[at]
            rsqrt_rms = torch.rsqrt(rms[at] + 1e-6)
            fac_g = fac.grad_factor_at(at)
            return [g_i, torch.clamp(g_i, -0.1, 0.1), p[index].unsqueeze(0), m_i, rms[at], m_i * rsqrt_rms, rsqrt_rms,
                    g_i * fac_g, g_i * rsqrt_rms, fac.row[at], fac.col[at], fac.rsqrt_row[at], fac.rsqrt_col[at],
                    m_i * fac.momentum_factor_at(at, fac_g)]

        weights = self.network_weights(theta, control[1:])
        no_inputs = torch.zeros(0, dtype=torch.float32, device=p.device)
        return normalized_mlp(weights, features, p.shape, no_inputs, int(self.ff_hidden_layers) + 1,
                              DirectionMagnitudeReadout(self.exp_mult, self.step_mult),
                              chunk_size=chunk_size, eps=self.normalization_eps, hooks=hooks)

    def step_scale(self, p: Tensor, control: Tensor) -> Tensor:
        """The factor of the network's direction: the scheduler's ``lr_mult`` (× ``rms(p)`` with
        ``param_scale_mult``)."""
        scale = control[0]
        if self.param_scale_mult:
            scale = scale * param_rms(p)
        return scale


@register_rule
@dataclasses.dataclass(frozen=True)
class CeloAdam(ClippedGradient, ScheduledRule):
    """Celo-Adam: Celo's learned scheduler setting Adam's per-tensor learning rate (``amoudgl/celo-adam``)."""

    name: ClassVar[str] = "celo_adam"
    stackable: ClassVar[bool] = True  # update_stacked is batched; update is it on a stack of one

    lstm_hidden_size: int = 64
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1000.0
    step_mult: float = 0.001
    param_scale_mult: bool = False
    tensor_features: bool = False
    lr_schedule: str = "learned"
    orthogonalize: bool = False

    def __post_init__(self) -> None:
        self.check_lr_schedule()
        if int(self.lstm_hidden_size) < 1:
            raise ValueError(f"lstm_hidden_size must be a positive integer, got {self.lstm_hidden_size!r}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.schedule_theta_shapes()

    def summary_size(self) -> int:
        return 1 + RANK_SLOTS + 2 if self.tensor_features else 0

    def tensor_flops(self, shape: tuple[int, ...]) -> int | None:
        if not self.orthogonalize:
            return None  # Adam: element-wise only
        if len(shape) < 2:
            return 0
        from .celo2 import Celo2, newton_schulz_flops

        return newton_schulz_flops(shape[0], math.prod(shape[1:]), int(Celo2.ns_iters))  # as orthogonalized sees it

    def tensor_summary(self, param: Tensor, grad: Tensor, state: State) -> Tensor:
        if not self.tensor_features:
            return super().tensor_summary(param, grad, state)
        return accumulator_summary(param, state["momentum"], state["rms"][0])

    def init_theta(self, generator: torch.Generator | None = None) -> Theta:
        return self.init_schedule_theta(generator)

    def init_state(self, param: Tensor) -> State:
        shape = tuple(param.shape)
        zeros = _zeros_like_decays(param)
        return {"momentum": zeros(1, shape), "rms": zeros(1, shape)} | self.lstm_state(param)

    def update(self, theta: Theta, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
               chunk_size: int | None = None, *, control: Tensor) -> tuple[Tensor, State]:
        # One tensor is a stack of one: the same code (what meta-training vmaps and the optimizer stacks).
        direction, new_state = self.update_stacked(
            theta, param.unsqueeze(0), grad.unsqueeze(0), {key: state[key].unsqueeze(0) for key in ("momentum", "rms")},
            step, chunk_size, control=control.unsqueeze(0))
        return direction[0], {key: value[0] for key, value in new_state.items()}

    def update_stacked(self, theta: Theta, params: Tensor, grads: Tensor, states: State, step: Tensor | int,
                       chunk_size: int | None = None, *, control: Tensor) -> tuple[Tensor, State]:
        """:meth:`update` of ``B`` same-shape tensors stacked on axis 0, bit for bit: Adam's element-wise
        arithmetic runs once over the whole stack (each element sees the same float operations, its
        tensor's ``lr_mult`` broadcast from ``control`` ``(B, C)``); Newton–Schulz and ``rms(p)`` stay one
        call per tensor, because a batched matrix product or reduction may sum in another order."""
        stack, shape = params.shape[0], tuple(params.shape[1:])
        g = self.clipped(grads)
        # a state (B, 1, *shape) lies in memory as (1, B, *shape): the decay axis first, as one tensor has it
        momentum, rms = self.advance_moments(states["momentum"].reshape(1, *g.shape),
                                             states["rms"].reshape(1, *g.shape), g)
        per_tensor = control.mT.reshape(control.shape[1], stack, *([1] * len(shape)))  # control[0] → (B, 1, …)
        direction = self.adam_direction(momentum[0], rms[0], as_step_tensor(step, params) + 1.0, per_tensor)
        if self.orthogonalize and len(shape) >= 2:
            direction = torch.stack([orthogonalized(row) for row in direction])
        if self.param_scale_mult:
            direction = direction * torch.stack([param_rms(param) for param in params]).reshape(per_tensor[0].shape)
        return direction, {"momentum": momentum.reshape(stack, 1, *shape), "rms": rms.reshape(stack, 1, *shape)}

    def advance_moments(self, momentum: Tensor, rms: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Adam's new first and second moments ``(1, …)`` of the clipped gradient ``g`` (element-wise)."""
        return _ema((self.beta1,), momentum, g), _ema((self.beta2,), rms, g * g)

    def adam_direction(self, momentum: Tensor, rms: Tensor, count: Tensor, control: Tensor) -> Tensor:
        """``lr·m̂ / (eps + √(v̂ + 1e-10))`` at ``lr = step_mult·lr_mult``, bias-corrected for ``count`` steps
        (element-wise: the same on a piece of the tensor as on the whole)."""
        m_hat = momentum / (1.0 - self.beta1 ** count)
        v_hat = rms / (1.0 - self.beta2 ** count)
        lr = control[0] * self.step_mult
        return m_hat * (lr / (self.eps + torch.sqrt(v_hat + 1e-10)))

