"""The learned scheduler of Celo, Celo-Adam and VeLO: the whole-model phase of a scheduled rule.

A *scheduled* rule (``UpdateRule.scheduled``) runs, once per optimizer step and before any
per-tensor update, a small network over **all** parameter tensors of the model together
(learned_optimization's ``HyperV2`` design, reused by Celo):

1. the training loss goes into a rolling buffer of 10 bias-corrected EMAs whose half-lives are
   log-spaced from 10 steps to the planned number of steps; the loss is first clipped to twice the
   largest running mean, so one spike does not wreck the buffer. Nine *loss features* compare the
   means with their running minima (:class:`LossBuffer`);
2. nine *fraction features* ``tanh(10·(iteration/num_steps − s))`` say how far training is
   (:func:`fraction_features`) — so the optimizer must know the planned number of steps;
3. per tensor, those 18 numbers plus the rule's own per-tensor summary (VeLO: statistics of the
   parameter and its accumulators; Celo: nothing) form one row of the scheduler input ``x (T, F)``;
4. a *mix* layer couples the tensors: ``x ← W₂x + b₂ + max_over_tensors(relu(W₁x + b₁))``;
5. an LSTM (haiku's, one row of hidden/cell state per tensor) and two read-outs: per-tensor
   ``lr_mult = 0.1·exp(w·h + b)`` (VeLO: ``w·h + b`` itself, :meth:`ScheduledRule.lr_mult_readout`)
   and, for rules that mix several per-element networks, the mixing ``controls`` (``rnn_to_controls``).

A rule with a ``lr_schedule`` other than ``"learned"`` (Celo, Celo-Adam) replaces the learned ``lr_mult``
by a fixed function of the fraction of training done (:data:`LR_SCHEDULES`): ``"constant"`` (×1,
Celo's phase 1, where only the update rule is meta-trained) or ``"warmup_cosine"``
(:func:`warmup_cosine`, the standard schedule of hand-designed optimizers and Celo2). The mixing
controls still come from the LSTM.

Meta-parameters keep the original haiku names (``rnn_params/…``, ``lstm_init_state/…``), so a
published checkpoint converts by flattening its tree. The original also creates a first mix
layer ``rnn_params/linear`` whose output it discards; it is kept (it is in every checkpoint) and
has no effect.

**State.** The loss buffer, the iteration and ``num_steps`` are whole-model state
(:meth:`ScheduledRule.init_schedule_state`); each tensor's LSTM row lives in that tensor's own
state (keys :data:`LSTM_KEYS`), so it follows the tensor through stacking, skipping and
``state_dict``. A row whose tensor has not been updated yet (its step count is 0) starts from
theta's ``lstm_init_state`` — decided inside :meth:`ScheduledRule.schedule` with ``torch.where``,
so initial states need no theta and gradients reach ``lstm_init_state`` under meta-training.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from .base import State, Theta, UpdateRule

FRACTION_TIMESCALES: tuple[float, ...] = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
NUM_LOSS_EMAS = 10
# Loss features are the first NUM_LOSS_EMAS − 1 EMAs compared with the next-longer one.
NUM_LOSS_FEATURES = NUM_LOSS_EMAS - 1
NUM_GLOBAL_FEATURES = len(FRACTION_TIMESCALES) + NUM_LOSS_FEATURES
LSTM_KEYS = ("lstm_hidden", "lstm_cell")
RNN = "rnn_params/"
# Slots of the one-hot tensor rank in :func:`accumulator_summary` (ranks ≥ 5 get none).
RANK_SLOTS = 5
# Fixed schedules a rule's lr_schedule may name instead of "learned" (see warmup_cosine).
LR_SCHEDULES = ("learned", "constant", "warmup_cosine")
# warmup_cosine's linear warmup: this fraction of the planned steps.
WARMUP_FRACTION = 0.05
# The running minimum's starting value in the original (any loss is below it).
_RUNNING_MIN_START = 999999999999.0


def fraction_features(iteration: Tensor, num_steps: Tensor) -> Tensor:
    """``tanh(10·(iteration/num_steps − s))`` for the 9 timescales ``s`` → ``(9,)``."""
    scales = torch.tensor(FRACTION_TIMESCALES, dtype=torch.float32, device=iteration.device)
    fraction = iteration.to(torch.float32) / num_steps.to(torch.float32)
    return torch.tanh((fraction - scales) * 10.0)


def warmup_cosine(iteration: Tensor, num_steps: Tensor, warmup_fraction: float = WARMUP_FRACTION) -> Tensor:
    """The multiplier of step ``iteration`` (0-based) of ``num_steps``: linear warmup, then cosine decay to 0.

    ``(iteration + 1) / W`` for the first ``W = max(1, round(warmup_fraction·num_steps))`` steps, then
    ``½·(1 + cos(π·(iteration + 1 − W) / (num_steps − W + 1)))``: 1 at the warmup's end, small and positive at
    the last planned step, 0 beyond. Tensors in, a float32 tensor out (vmap-friendly).
    """
    steps = num_steps.to(torch.float32)
    done = iteration.to(torch.float32) + 1.0
    warmup = torch.clamp(torch.round(steps * warmup_fraction), min=1.0)
    decay = torch.clamp((done - warmup) / torch.clamp(steps - warmup + 1.0, min=1.0), 0.0, 1.0)
    return torch.where(done <= warmup, done / warmup, 0.5 * (1.0 + torch.cos(math.pi * decay)))


def fixed_lr_mult(schedule: str, iteration: Tensor, num_steps: Tensor) -> Tensor | None:
    """The ``lr_mult`` of a fixed :data:`LR_SCHEDULES` entry at ``iteration``, or None for ``"learned"``."""
    if schedule == "learned":
        return None
    if schedule == "constant":
        return torch.ones((), dtype=torch.float32, device=iteration.device)
    if schedule == "warmup_cosine":
        return warmup_cosine(iteration, num_steps)
    raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")


def clip_log_abs(value: Tensor, scale: float = 10.0) -> Tensor:
    """``clip(log(1e-8 + |scale·value|), −5, 5) / 2``: a statistic squashed to ``[−2.5, 2.5]``."""
    return torch.clamp(torch.log(1e-8 + torch.abs(value * scale)), -5.0, 5.0) * 0.5


def _mean_square_about(x: Tensor, center: Tensor) -> Tensor:
    """``mean((x − center)²)`` over all of ``x``, with one full-size temporary where nothing is differentiated."""
    deviation = x - center
    return torch.mean(torch.square(deviation) if torch.is_grad_enabled() else deviation.mul_(deviation))


def accumulator_summary(param: Tensor, momenta: Tensor, rms: Tensor) -> Tensor:
    """VeLO's per-tensor scheduler inputs, ``1 + RANK_SLOTS + 2·k`` numbers for ``k`` momentum decays.

    From the parameter, its momenta ``(k, …)`` and its second-moment accumulator ``rms`` (all *before*
    this step), every statistic divided by ``rms(p) = √max(mean(p²), 1e-9)``: ``mean_rms``, the one-hot
    ``rank`` (how many dims are > 1), ``var_m`` per momentum decay and ``var_rms`` — the spread of ``rms``
    around each momentum's mean, as the original computes it —, each squashed by :func:`clip_log_abs`.
    It tells the scheduler which kind of tensor it steers (a bias, a matrix, a convolution kernel) and
    how noisy its gradient is relative to its scale, so the step can differ from tensor to tensor.
    """
    p = param.reshape(1) if param.dim() == 0 else param
    norm = torch.rsqrt(torch.clamp(torch.mean(torch.square(p)), min=1e-9))
    rms = rms * norm
    var_m, var_rms = [], []
    # one momentum decay at a time: a few full-size temporaries, not several (k, *shape) ones
    for momentum in momenta:
        momentum = momentum * norm
        mean_m = torch.mean(momentum)
        var_m.append(_mean_square_about(momentum, mean_m))
        var_rms.append(_mean_square_about(rms, mean_m))
    mean_rms = torch.mean(rms)
    rank = sum(1 for size in param.shape if size > 1)
    one_hot = torch.tensor([1.0 if slot == rank else 0.0 for slot in range(RANK_SLOTS)], dtype=p.dtype,
                           device=p.device)
    squashed = clip_log_abs(torch.stack([mean_rms, *var_m, *var_rms]))  # one element-wise pass for all
    return torch.cat([squashed[:1], one_hot, squashed[1:]])


class LossBuffer:
    """The rolling loss statistics (pure functions of a state dict; vmap-friendly)."""

    @staticmethod
    def init(num_steps: int, device: torch.device | None = None) -> State:
        """Zero means, huge running minima and the decays of half-lives ``logspace(1, log10(num_steps), 10)``."""
        exponents = torch.linspace(1.0, math.log10(num_steps), NUM_LOSS_EMAS, dtype=torch.float32, device=device)
        halflife = torch.pow(torch.tensor(10.0, dtype=torch.float32, device=device), exponents)
        return {"loss_means": torch.zeros(NUM_LOSS_EMAS, dtype=torch.float32, device=device),
                "loss_running_min": torch.full((NUM_LOSS_EMAS,), _RUNNING_MIN_START, dtype=torch.float32,
                                               device=device),
                "loss_decays": torch.exp(-1.0 / halflife)}

    @staticmethod
    def update(state: State, loss: Tensor, iteration: Tensor) -> State:
        """Add ``loss`` (clipped to twice the largest bias-corrected mean, except at iteration 0)."""
        decays, means = state["loss_decays"], state["loss_means"]
        count = iteration.to(torch.float32) + 1.0
        corrected = means / (1.0 - decays ** count)
        approx_max = torch.where(iteration == 0, loss, corrected.max())
        loss = torch.minimum(approx_max.abs() * 2.0, loss)
        means = means * decays + loss * (1.0 - decays)
        corrected = means / (1.0 - decays ** count)
        return {"loss_means": means, "loss_running_min": torch.minimum(state["loss_running_min"], corrected),
                "loss_decays": decays}

    @staticmethod
    def features(state: State, count: Tensor) -> Tensor:
        """The 9 loss features after ``count`` losses (all zero for the first two)."""
        decays = state["loss_decays"]
        corrected = state["loss_means"] / (1.0 - decays ** count.to(torch.float32))
        longer, shorter = corrected[1:], corrected[:-1]
        running_min = state["loss_running_min"][:-1]
        spread = torch.clamp(longer - running_min, min=1e-8)
        feature = torch.clamp((shorter - running_min) / spread - 1.0, -1.0, 1.0)
        return torch.where(count <= 2, feature * 0.0, feature)


def lstm_cell(weight: Tensor, bias: Tensor, x: Tensor, hidden: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
    """haiku's ``LSTM`` step: gates ``i, g, f, o`` from ``[x, h]``, forget bias +1 → ``(hidden, cell)``."""
    gates = torch.cat([x, hidden], dim=-1) @ weight + bias
    i, g, f, o = gates.chunk(4, dim=-1)
    cell = torch.sigmoid(f + 1.0) * cell + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(cell), cell


class ScheduledRule(UpdateRule):
    """Base of the learned-scheduler rules: the scheduler's theta, state and forward pass.

    Subclasses (dataclasses) define ``lstm_hidden_size`` and :attr:`num_mixed_networks` (0: no
    ``rnn_to_controls`` read-out), :meth:`summary_size` / :meth:`tensor_summary` if their scheduler
    sees per-tensor statistics, and their per-tensor ``update(…, control=…)`` where ``control`` is
    the tensor's row of :meth:`schedule`'s output: ``[lr_mult, *mixing weights]``.
    """

    scheduled: ClassVar[bool] = True
    needs_loss: ClassVar[bool] = True
    # Whether the mixing controls go through a softmax (Celo) or are used as they are (VeLO).
    softmax_controls: ClassVar[bool] = True
    schedule_tensor_keys: ClassVar[tuple[str, ...]] = LSTM_KEYS
    lstm_hidden_size: int  # a dataclass field of every subclass
    # "learned", or a fixed schedule of LR_SCHEDULES in place of the learned lr_mult (a field of Celo, Celo-Adam)
    lr_schedule: str = "learned"

    def check_lr_schedule(self) -> None:
        """``ValueError`` unless ``lr_schedule`` is one of :data:`LR_SCHEDULES` (for ``__post_init__``)."""
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")

    @property
    def num_mixed_networks(self) -> int:
        """How many per-element networks the controls mix (0: the scheduler emits ``lr_mult`` only)."""
        return 0

    def summary_size(self) -> int:
        """Numbers per tensor in :meth:`tensor_summary` (0 for Celo)."""
        return 0

    def tensor_summary(self, param: Tensor, grad: Tensor, state: State) -> Tensor:
        """Per-tensor scheduler inputs from the parameter, its gradient and its state *before* this step."""
        return param.new_zeros(0, dtype=torch.float32)

    def lr_mult_readout(self, linear: Tensor) -> Tensor:
        """``lr_mult`` from the ``step_size`` read-out's linear output: ``0.1·exp(linear)`` (Celo);
        VeLO uses the linear output as it is."""
        return torch.exp(linear) * 0.1

    # ----------------------------------------------------------------------------- theta
    def schedule_theta_shapes(self) -> dict[str, tuple[int, ...]]:
        hidden, inputs = int(self.lstm_hidden_size), NUM_GLOBAL_FEATURES + self.summary_size()
        shapes: dict[str, tuple[int, ...]] = {"lstm_init_state/hidden": (1, hidden),
                                              "lstm_init_state/cell": (1, hidden)}
        for layer in ("linear", "linear_1", "linear_2"):
            shapes[f"{RNN}{layer}/w"], shapes[f"{RNN}{layer}/b"] = (inputs, hidden), (hidden,)
        shapes[f"{RNN}rnn/linear/w"], shapes[f"{RNN}rnn/linear/b"] = (2 * hidden, 4 * hidden), (4 * hidden,)
        if self.num_mixed_networks:
            shapes[f"{RNN}rnn_to_controls/w"] = (hidden, self.num_mixed_networks)
            shapes[f"{RNN}rnn_to_controls/b"] = (self.num_mixed_networks,)
        shapes[f"{RNN}step_size/w"], shapes[f"{RNN}step_size/b"] = (hidden, 1), (1,)
        return shapes

    def init_schedule_theta(self, generator: torch.Generator | None) -> Theta:
        """haiku's defaults: truncated normal std 1/√fan_in weights, zero biases, zero LSTM start."""
        from .features import truncated_normal_init

        theta = {}
        for key, shape in self.schedule_theta_shapes().items():
            if key.endswith("/w") and not key.endswith("rnn_to_controls/w"):
                theta[key] = truncated_normal_init(shape, 1.0 / math.sqrt(shape[0]), generator)
            else:  # biases, the LSTM's start, and rnn_to_controls (haiku Constant(0) in the original)
                theta[key] = torch.zeros(shape, dtype=torch.float32)
        return theta

    def with_summary_inputs(self, theta: Theta) -> Theta:
        """``theta`` of this rule *without* per-tensor summary inputs, given zero weights for them.

        The mix layers' input matrices (``rnn_params/linear*/w``) gain :meth:`summary_size` zero rows, so
        the scheduler computes exactly what it computed without the summaries; meta-training can then
        learn to use them (a warm start from, e.g., the published Celo-Adam). Every other entry must
        already have this rule's shape.
        """
        extra, widened = self.summary_size(), dict(theta)
        for key, shape in self.schedule_theta_shapes().items():
            value = theta.get(key)
            if value is None:
                raise ValueError(f"theta has no {key!r}")
            if tuple(value.shape) == shape:
                continue
            narrower = (shape[0] - extra, *shape[1:])
            if not (key.startswith(f"{RNN}linear") and key.endswith("/w") and tuple(value.shape) == narrower):
                raise ValueError(f"theta[{key!r}] has shape {tuple(value.shape)}; expected {shape}, or {narrower} "
                                 f"without the {extra} per-tensor summary inputs")
            widened[key] = torch.cat([value, value.new_zeros((extra, *shape[1:]))])
        return widened

    # ----------------------------------------------------------------------------- state
    def init_schedule_state(self, total_steps: int, device: torch.device | None = None) -> State:
        """Whole-model state: iteration 0, the planned ``num_steps`` and the loss buffer."""
        if isinstance(total_steps, bool) or int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"rule {self.name!r} needs the planned number of steps as a positive integer, "
                             f"got {total_steps!r}")
        return {"iteration": torch.zeros((), dtype=torch.float32, device=device),
                "num_steps": torch.tensor(float(total_steps), dtype=torch.float32, device=device),
                **LossBuffer.init(int(total_steps), device)}

    def lstm_state(self, param: Tensor) -> State:
        """The per-tensor LSTM rows (zeros; replaced by theta's start on the tensor's first step)."""
        zeros = torch.zeros(int(self.lstm_hidden_size), dtype=torch.float32, device=param.device)
        return {"lstm_hidden": zeros, "lstm_cell": zeros.clone()}

    # --------------------------------------------------------------------------- forward
    def schedule(self, theta: Theta, schedule_state: State, tensor_states: State, summaries: Tensor,
                 tensor_steps: Tensor, loss: Tensor) -> tuple[Tensor, State, State]:
        """One scheduler step over the ``T`` tensors updated this step.

        Args:
            schedule_state: :meth:`init_schedule_state`'s keys.
            tensor_states: ``lstm_hidden`` / ``lstm_cell`` ``(T, H)``, the tensors' rows.
            summaries: ``(T, summary_size)`` from :meth:`tensor_summary`.
            tensor_steps: ``(T,)`` how many updates each tensor has had (0: start its LSTM row from theta).
            loss: the training loss of this step (scalar).

        Returns:
            ``controls (T, 1 + num_mixed_networks)`` — ``lr_mult`` then the mixing weights —, the new
            whole-model state and the new LSTM rows.
        """
        iteration = schedule_state["iteration"]
        buffer = LossBuffer.update(schedule_state, loss.to(torch.float32), iteration)
        global_features = torch.cat([fraction_features(iteration, schedule_state["num_steps"]),
                                     LossBuffer.features(buffer, iteration + 1.0)])
        count = summaries.shape[0]
        x = torch.cat([global_features.expand(count, -1), summaries], dim=-1)
        # the mix layer: every tensor sees the max over all tensors
        mixed = torch.relu(x @ theta[f"{RNN}linear_1/w"] + theta[f"{RNN}linear_1/b"])
        x = x @ theta[f"{RNN}linear_2/w"] + theta[f"{RNN}linear_2/b"] + mixed.max(dim=0, keepdim=True).values
        fresh = (tensor_steps == 0).unsqueeze(-1)
        hidden = torch.where(fresh, theta["lstm_init_state/hidden"], tensor_states["lstm_hidden"])
        cell = torch.where(fresh, theta["lstm_init_state/cell"], tensor_states["lstm_cell"])
        hidden, cell = lstm_cell(theta[f"{RNN}rnn/linear/w"], theta[f"{RNN}rnn/linear/b"], x, hidden, cell)
        lr_mult = self.lr_mult_readout(hidden @ theta[f"{RNN}step_size/w"] + theta[f"{RNN}step_size/b"])
        fixed = fixed_lr_mult(self.lr_schedule, iteration, schedule_state["num_steps"])
        if fixed is not None:
            lr_mult = fixed.expand_as(lr_mult)
        parts = [lr_mult]
        if self.num_mixed_networks:
            controls = hidden @ theta[f"{RNN}rnn_to_controls/w"] + theta[f"{RNN}rnn_to_controls/b"]
            parts.append(torch.softmax(controls, dim=-1) if self.softmax_controls else controls)
        new_state = {**buffer, "iteration": iteration + 1.0, "num_steps": schedule_state["num_steps"]}
        return torch.cat(parts, dim=-1), new_state, {"lstm_hidden": hidden, "lstm_cell": cell}
