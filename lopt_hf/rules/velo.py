"""``velo``: VeLO, learned_optimization's ``HyperV2`` hyper-network optimizer.

VeLO (Metz et al., "VeLO: Training Versatile Learned Optimizers by Scaling Up",
arXiv 2211.09760) as cloned in amoudgl/celo ``celo/optimizers/velo.py`` (Apache-2.0), which
exposes the factor ``ff_mult`` that the original hard-codes to 100. This port reproduces that
code's reference vectors (``tests/fixtures/refvectors/velo_{s,4000}_random_perturbed``).

VeLO is Celo's ancestor and shares its per-element rule (:class:`lopt_hf.rules.celo.Celo`: the
same accumulators, the same 14 feature groups, the same per-tensor-normalised MLP and
``param_scale`` step), so this rule *is* a :class:`Celo` with three differences, all in how the
scheduler (:mod:`lopt_hf.rules.scheduler`) steers it:

* **per-tensor scheduler inputs** (:meth:`Velo.tensor_summary`): after the 18 global features
  (fraction and loss features) each tensor adds 12 numbers computed from its parameter and its
  accumulators *before* this step's update, all divided by ``rms(p) = √max(mean(p²), 1e-9)``:
  ``mean_rms`` (1), the one-hot ``rank`` (5 slots: how many dims are > 1), ``var_m`` (one per
  momentum decay) and ``var_rms`` (3) — each statistic ``s`` enters as ``clip(log(1e-8 + |10·s|),
  ±5)/2``. ``var_rms`` is the original's: the spread of ``rms`` around the *momenta's* mean, so
  it has one entry per momentum decay. The original concatenates its features in sorted-key
  order (fraction_left, loss_features, mean_rms, rank, var_m, var_rms) — the global features
  first, as :meth:`ScheduledRule.schedule` puts them;
* the mixing **controls are used as they are** (no softmax) and the mixed network is scaled by
  ``ff_mult`` (``mean_i(c_i·θ_i)·ff_mult``); ``rnn_to_controls`` starts from haiku's default
  initialiser, not zeros;
* ``lr_mult`` is the ``step_size`` read-out itself, not ``0.1·exp(·)``.

The defaults are the ``velo_4000`` architecture of the published VeLO checkpoint (LSTM 512, 256
mixed per-element networks, ``ff_mult`` 100); ``velo_s`` of the Celo paper is
``lstm_hidden_size=64, param_inits=32, ff_mult=1.0``. Both correspond to the original with
``use_bugged_next_lstm_state=False`` and ``use_bugged_loss_features=False`` (the loss buffer's
half-lives reach the planned number of steps). Theta keeps the haiku names verbatim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor

from .base import State, Theta, register_rule
from .celo import Celo
from .features import truncated_normal_init
from .scheduler import RANK_SLOTS, RNN, accumulator_summary


@register_rule
@dataclasses.dataclass(frozen=True)
class Velo(Celo):
    """VeLO: a per-tensor LSTM that mixes ``param_inits`` per-element MLPs and sets each tensor's step size."""

    name: ClassVar[str] = "velo"
    softmax_controls: ClassVar[bool] = False

    lstm_hidden_size: int = 512
    param_inits: int = 256
    ff_mult: float = 100.0

    def summary_size(self) -> int:
        return 1 + RANK_SLOTS + 2 * len(self.momentum_decays)

    def tensor_summary(self, param: Tensor, grad: Tensor, state: State) -> Tensor:
        return accumulator_summary(param, state["momentum"], state["rms"][0])

    def lr_mult_readout(self, linear: Tensor) -> Tensor:
        return linear

    def init_theta(self, generator: torch.Generator | None = None) -> Theta:
        theta = super().init_theta(generator)
        key = f"{RNN}rnn_to_controls/w"
        shape = tuple(theta[key].shape)
        theta[key] = truncated_normal_init(shape, 1.0 / math.sqrt(shape[0]), generator)
        return theta

    def network_weights(self, theta: Theta, mixing: Tensor) -> Theta:
        """Celo's mixed per-element network, scaled by ``ff_mult``."""
        return {key: value * self.ff_mult for key, value in super().network_weights(theta, mixing).items()}
