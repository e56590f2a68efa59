"""``opt2vec``: an embedding of the recent optimisation history sets the learning rate and momentum.

After Opt2Vec (a "lightweight meta-learning optimizer"): every step, a row of scalar statistics
is appended to a rolling history of the last ``history_length`` steps; a small MLP encodes the
flattened history into an ``embedding_dim`` embedding, and two linear heads read from it

* a learning-rate scale ``s = max_lr_scale ** tanh(z_lr)`` (in ``[1/max_lr_scale, max_lr_scale]``),
* a momentum coefficient ``mu = max_momentum * sigmoid(z_mu)``,

which drive a heavy-ball momentum-SGD step (``torch.optim.SGD`` with ``momentum=mu``)::

    m <- mu * m + g
    step = base_lr * s * m        (LearnedOptimizer applies param -= lr * step)

History row of a step (each feature O(1) whatever the scale of the task):

* ``slog(loss)`` — the training loss of the batch (``slog(x) = sign(x) * log1p(|x|)``);
* ``slog(rms(g))`` — the gradient norm, as an RMS so tensors of every size are comparable;
* ``log(s_prev)`` — the learning rate the rule used on the previous step, relative to ``base_lr``;

and with ``use_extended_features``:

* ``slog(rms(param))`` — the parameter norm (RMS);
* ``cos(g, m_prev)`` — gradient diversity, as the agreement of the new gradient with the momentum
  (the running gradient direction): 1 = same direction, -1 = reversal, 0 before any momentum;
* ``slog(loss_t - 2 loss_{t-1} + loss_{t-2})`` — the loss curvature (second difference; 0 for the
  first two steps).

**Per-tensor history.** The reference optimizer keeps one history for the whole model. Here the
history is kept *per parameter tensor*, like every other piece of rule state: each tensor sees the
shared loss but its own gradient/parameter statistics, so different layers can get different
learning-rate scales and momenta (as in LARS/LAMB), the rule stays a pure per-tensor function
that ``vmap`` batches and ``torch.func.grad`` differentiates, and ``LearnedOptimizer`` needs no
second, whole-model pass. The only thing a tensor cannot compute itself is the loss, which the
rule receives through the ``loss`` keyword (``needs_loss = True``; see
:class:`lopt_hf.rules.base.UpdateRule`).

The learning-rate feature is the rule's own scale ``s``, not the optimizer's ``lr`` (a scheduler's
multiplier): ``lr`` multiplies the returned step from outside, as for every rule.

``theta`` is the MLP ``w0, b0`` (history → embedding), ``w1, b1`` (embedding → embedding) and the
heads ``w2, b2`` (embedding → ``[z_lr, z_mu]``). ``init_theta`` draws small head weights and sets
``b2`` so that at initialisation the rule is close to momentum SGD with ``base_lr`` and
``initial_momentum``. Everything is differentiable in ``theta`` — through the step and through the
new state (momentum, history, learning-rate scale) — so unrolled meta-training (PES, BPTT) works.
``chunk_size`` is accepted and ignored: the per-element work is two elementwise ops.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor

from .base import RuleConfigError, State, Theta, UpdateRule, as_step_tensor, register_rule
from .features import activation_fn, init_mlp_theta, mlp_forward, mlp_theta_shapes

BASIC_FEATURES = ("loss", "grad_norm", "learning_rate")
EXTENDED_FEATURES = ("param_norm", "grad_diversity", "loss_curvature")
# Added under square roots so that all-zero tensors have finite values *and* finite derivatives.
_TINY = 1e-30
# Head weights start this much smaller than the encoder's, so init ≈ momentum SGD.
HEAD_INIT_SCALE = 0.01


def slog(x: Tensor) -> Tensor:
    """``sign(x) * log1p(|x|)``: identity near 0, logarithmic for large values, smooth everywhere."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def _rms(x: Tensor) -> Tensor:
    return torch.sqrt(torch.mean(x * x) + _TINY)


@register_rule
@dataclasses.dataclass(frozen=True)
class Opt2Vec(UpdateRule):
    """History embedding → learning-rate scale and momentum for a momentum-SGD step."""

    name = "opt2vec"
    needs_loss: ClassVar[bool] = True

    base_lr: float = 0.01
    embedding_dim: int = 64
    history_length: int = 16
    activation: str = "gelu"
    use_extended_features: bool = True
    initial_momentum: float = 0.9
    max_momentum: float = 0.99
    max_lr_scale: float = 10.0

    def __post_init__(self) -> None:
        activation_fn(self.activation)  # validate early
        for field in ("embedding_dim", "history_length"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise RuleConfigError(f"opt2vec: {field} must be a positive integer, got {value!r}")
        if not isinstance(self.use_extended_features, bool):
            raise RuleConfigError(f"opt2vec: use_extended_features must be true or false, "
                                  f"got {self.use_extended_features!r}")
        if not (self.base_lr > 0 and math.isfinite(self.base_lr)):
            raise RuleConfigError(f"opt2vec: base_lr must be positive and finite, got {self.base_lr!r}")
        if not 0.0 < self.max_momentum < 1.0:
            raise RuleConfigError(f"opt2vec: max_momentum must be in (0, 1), got {self.max_momentum!r}")
        if not 0.0 < self.initial_momentum < self.max_momentum:
            raise RuleConfigError(f"opt2vec: initial_momentum must be in (0, max_momentum={self.max_momentum}), "
                                  f"got {self.initial_momentum!r}")
        if not (self.max_lr_scale > 1.0 and math.isfinite(self.max_lr_scale)):
            raise RuleConfigError(f"opt2vec: max_lr_scale must be > 1 and finite, got {self.max_lr_scale!r}")

    # ------------------------------------------------------------------ meta-parameters
    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names of the columns of the history, in order."""
        return BASIC_FEATURES + (EXTENDED_FEATURES if self.use_extended_features else ())

    @property
    def _layer_sizes(self) -> list[int]:
        return [self.history_length * len(self.feature_names), self.embedding_dim, self.embedding_dim, 2]

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        return mlp_theta_shapes(self._layer_sizes)

    def init_theta(self, generator: torch.Generator | None = None) -> Theta:
        theta = init_mlp_theta(self.theta_shapes(), generator, "haiku")
        theta["w2"] = theta["w2"] * HEAD_INIT_SCALE
        # sigmoid(b) * max_momentum == initial_momentum; tanh(0) = 0 → learning-rate scale 1.
        ratio = self.initial_momentum / self.max_momentum
        theta["b2"] = torch.tensor([0.0, math.log(ratio / (1.0 - ratio))], dtype=torch.float32)
        return theta

    # ------------------------------------------------------------------------ per tensor
    def init_state(self, param: Tensor) -> State:
        zeros = {"dtype": torch.float32, "device": param.device}
        state = {
            "momentum": torch.zeros_like(param, dtype=torch.float32),
            "history": torch.zeros(self.history_length, len(self.feature_names), **zeros),
            "log_lr_scale": torch.zeros((), **zeros),
        }
        if self.use_extended_features:
            state["recent_losses"] = torch.zeros(2, **zeros)  # [loss_{t-2}, loss_{t-1}]
        return state

    def update(self, theta: Theta, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
               chunk_size: int | None = None, *, loss: Tensor | float | None = None) -> tuple[Tensor, State]:
        if loss is None:
            raise ValueError("rule 'opt2vec' needs the training loss: call rule.update(..., loss=loss); with "
                             "LearnedOptimizer use step(closure), step(loss=loss) or record_loss(loss)")
        if not isinstance(loss, Tensor):
            loss = torch.tensor(float(loss), dtype=param.dtype, device=param.device)
        if loss.dim() != 0:
            raise ValueError(f"rule 'opt2vec' needs a scalar loss, got shape {tuple(loss.shape)}")
        loss = loss.to(param.dtype)
        momentum = state["momentum"]

        features = [slog(loss), slog(_rms(grad)), state["log_lr_scale"].to(param.dtype)]
        new_state: State = {}
        if self.use_extended_features:
            dot = torch.sum(grad * momentum)
            cosine = dot / (torch.sqrt(torch.sum(grad * grad) + _TINY) * torch.sqrt(torch.sum(momentum * momentum)
                                                                                    + _TINY))
            previous = state["recent_losses"].to(param.dtype)
            curvature = loss - 2.0 * previous[1] + previous[0]
            has_two_previous = as_step_tensor(step, param) >= 2
            features += [slog(_rms(param)), cosine, torch.where(has_two_previous, slog(curvature),
                                                                torch.zeros_like(curvature))]
            new_state["recent_losses"] = torch.stack([previous[1], loss])

        row = torch.stack(features)
        history = torch.cat([state["history"][1:].to(param.dtype), row.unsqueeze(0)], dim=0)
        log_lr_scale, momentum_coefficient = self.read_history(theta, history)
        new_momentum = momentum_coefficient * momentum + grad
        step_out = (self.base_lr * torch.exp(log_lr_scale)) * new_momentum
        new_state.update({"momentum": new_momentum, "history": history, "log_lr_scale": log_lr_scale})
        return step_out, new_state

    def read_history(self, theta: Theta, history: Tensor) -> tuple[Tensor, Tensor]:
        """``(log s, mu)``: the log learning-rate scale and the momentum coefficient for a history."""
        heads = mlp_forward(theta, history.reshape(-1), 3, activation_fn(self.activation))
        return math.log(self.max_lr_scale) * torch.tanh(heads[0]), self.max_momentum * torch.sigmoid(heads[1])
