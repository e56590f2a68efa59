"""LoLO (Huang, Thérien & Belilovsky): a replay buffer and behaviour cloning on top of PES.

:class:`LoLOPES` is :class:`~lopt_hf.metatrain.estimators.PES` with two optional additions
(Algorithm 1 of the paper, mapped onto this package's truncated, persistent inner problems:
the paper's "unroll" is one inner *trajectory*, which PES advances ``truncation_length``
steps per outer step):

**Replay buffer** (``buffer_size`` M > 0). Every task slot keeps a FIFO queue of up to M inner
states (parameters, the learned optimizer's accumulators, the expert's Adam moments, step
index, task). When a trajectory ends, the next one starts from the queue head with probability
``1 − p_threshold`` (never at outer step 0, and only when the queue is not empty), continuing at
that state's step index K for a newly drawn length N (so it ends at K + N); otherwise it starts
fresh (K = 0). At every trajectory start a push step ``N_push ~ Uniform{K, …, K+N−1}`` is drawn;
when the trajectory reaches it, the state (the ``+z_0`` copy) is enqueued, dropping the head
when the queue is full. The head is *read*, not removed (Algorithm 1, line 4). States pushed
during one truncation are enqueued at its end, so the queue is constant within a truncation
(the data of a buffer-started trajectory is drawn for the head's task before the unroll).
The queue lives in the estimator state (``lolo_buffer/...`` tensors with a leading slot axis),
so it is checkpointed, resumed and split over processes like the rest of the state.

**Behaviour cloning** (``behaviour_cloning: true``). An Adam expert (``expert_lr``, betas
0.9/0.999, eps 1e-8, its moments kept per inner problem) steps from the same state as the
learned optimizer; the inner trajectory is ``θ_{n+1} = (1−α_t)·θ^Adam_{n+1} + α_t·θ^LO_{n+1}``
with ``α_t = t / (T−1)`` over the T outer steps (``total_outer_steps``; or a fixed ``alpha``).
With ``L^bc_n = ‖θ^LO_{n+1} − θ^Adam_{n+1}‖²`` (summed over parameter tensors) the per-step
meta-signal is ``(1−α_t)·ψ(Δ_ε L^bc_n) + α_t·ψ(Δ_ε L^task_n)`` with ψ the second-moment
normalisation of Eq. 5 over the steps of the truncation, per slot and antithetic pair,
``ψ(x_n) = x_n / sqrt(mean_n x_n² + ε₀)``; PES aggregates it exactly as it aggregates the raw
loss difference. At ``α_t = 1`` the cloning term has zero weight and there is nothing to
balance, so ψ is not applied and the signal is the raw ``Δ_ε L^task`` (this is what makes
LoLO without a buffer and with α fixed at 1 *exactly* PES). Without behaviour cloning the
signal is always the raw task-loss difference (plain PES; the buffer alone changes only which
states trajectories start from).

The learned optimizer's step is the one :class:`~lopt_hf.metatrain.unroll.VectorizedInnerTrainer`
takes; with behaviour cloning the step runs eagerly (the gradient is shared by both optimizers).
A scheduled rule's whole-model state is part of the inner state (``opt_state``), so a buffer start
resumes it as stored — its iteration and the planned number of steps of the trajectory that pushed
it — while a fresh start plans for its own drawn length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..adamw import adamw_step
from ..rules.base import UpdateRule
from .estimators import PES, EstimatorState, Theta, TrajectoryStart, TruncationPlan, TruncationRun, slot_generator
from .tasks import Batch, TaskFamily
from .unroll import InnerProblems

__all__ = ["LOLO_KEYS", "LoLOOptions", "LoLOPES", "ReplayBuffer", "alpha_schedule", "psi"]

LOLO_KEYS = ("buffer_size", "p_threshold", "behaviour_cloning", "expert_lr", "alpha", "psi_eps")

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class LoLOOptions:
    """LoLO switches: naive PES (``buffer_size=0, behaviour_cloning=False``), BC only, buffer only, full LoLO."""

    buffer_size: int = 4  # M: inner states kept per task slot (0: no replay buffer)
    p_threshold: float = 0.5  # P_th: a new trajectory starts from the buffer with probability 1 - P_th
    behaviour_cloning: bool = True
    expert_lr: float = 1e-3  # the Adam expert's learning rate
    alpha: float | None = None  # fixed α (None: the schedule t / (T - 1))
    psi_eps: float = 1e-12  # ε₀ of Eq. 5

    def __post_init__(self) -> None:
        if self.buffer_size < 0:
            raise ValueError(f"lolo.buffer_size must be >= 0, got {self.buffer_size}")
        if not 0.0 <= self.p_threshold <= 1.0:
            raise ValueError(f"lolo.p_threshold must be in [0, 1], got {self.p_threshold}")
        if not self.expert_lr > 0:
            raise ValueError(f"lolo.expert_lr must be > 0, got {self.expert_lr}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"lolo.alpha must be in [0, 1] or null, got {self.alpha}")
        if not self.psi_eps >= 0:
            raise ValueError(f"lolo.psi_eps must be >= 0, got {self.psi_eps}")


def alpha_schedule(outer_step: int, total_outer_steps: int) -> float:
    """``α_t = t / (T − 1)``, clamped to [0, 1] (``T = 1``: 1)."""
    if total_outer_steps <= 1:
        return 1.0
    return min(1.0, max(0.0, outer_step / (total_outer_steps - 1)))


def psi(x: Tensor, dim: int = 0, eps: float = 1e-12) -> Tensor:
    """Eq. 5: ``x_n / sqrt(mean_n x_n² + eps)`` along ``dim``."""
    return x / torch.sqrt(x.square().mean(dim, keepdim=True) + eps)


class ReplayBuffer:
    """FIFO queues of inner states, one per task slot, stored as tensors in an estimator state dict.

    Keys: ``lolo_buffer/count`` (K,) and ``lolo_buffer/<field>`` (K, M, ...) for every field of an
    entry (a flat ``dict[str, Tensor]``). Entry 0 is the head (oldest).
    """

    PREFIX = "lolo_buffer/"

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)

    def empty_state(self, example: dict[str, Tensor], num_slots: int) -> EstimatorState:
        """An empty buffer for ``num_slots`` slots whose entries look like ``example`` (one entry)."""
        state = {self.PREFIX + "count": torch.zeros(num_slots, dtype=torch.int64)}
        for key, value in example.items():
            state[self.PREFIX + key] = torch.zeros((num_slots, self.capacity, *value.shape), dtype=value.dtype)
        return state

    def count(self, state: EstimatorState, slot: int) -> int:
        return int(state[self.PREFIX + "count"][slot])

    def head(self, state: EstimatorState, slot: int) -> dict[str, Tensor] | None:
        """The head entry of ``slot`` (a copy), or None when its queue is empty."""
        if self.count(state, slot) == 0:
            return None
        return {key[len(self.PREFIX):]: value[slot, 0].clone() for key, value in state.items()
                if key.startswith(self.PREFIX) and key != self.PREFIX + "count"}

    def entries(self, state: EstimatorState, slot: int) -> list[dict[str, Tensor]]:
        return [{key[len(self.PREFIX):]: value[slot, index].clone() for key, value in state.items()
                 if key.startswith(self.PREFIX) and key != self.PREFIX + "count"}
                for index in range(self.count(state, slot))]

    def push(self, state: EstimatorState, slot: int, entry: dict[str, Tensor]) -> EstimatorState:
        """Enqueue ``entry`` at the tail of ``slot``'s queue (dropping the head when full); returns a new state."""
        state = dict(state)
        count = self.count(state, slot)
        full = count >= self.capacity
        for key, value in entry.items():
            name = self.PREFIX + key
            queue = state[name].clone()
            if full:
                queue[slot, :-1] = queue[slot, 1:].clone()
                queue[slot, -1] = value.to(queue.dtype)
            else:
                queue[slot, count] = value.to(queue.dtype)
            state[name] = queue
        counts = state[self.PREFIX + "count"].clone()
        counts[slot] = min(count + 1, self.capacity)
        state[self.PREFIX + "count"] = counts
        return state


@dataclasses.dataclass
class _Reset(TrajectoryStart):
    """A trajectory start, fresh or from the head of the slot's buffer (``entry``), and its push step."""

    entry: dict[str, Tensor] | None = None  # a buffer entry, or None: fresh
    push_step: int = -1


@dataclasses.dataclass
class _LoLORun(TruncationRun):
    bc_loss: Tensor | None = None  # (T, M) L^bc of every step (behaviour cloning)
    alpha: float = 1.0


class LoLOPES(PES):
    """PES with LoLO's replay buffer and behaviour cloning (see the module docstring)."""

    name = "lolo_pes"

    def __init__(self, task_family: TaskFamily, rule: UpdateRule, *, lolo: LoLOOptions | dict[str, Any] | None = None,
                 total_outer_steps: int = 1, **options: Any) -> None:
        super().__init__(task_family, rule, **options)
        if isinstance(lolo, dict):
            unknown = sorted(set(lolo) - set(LOLO_KEYS))
            if unknown:
                raise ValueError(f"unknown lolo option(s) {unknown}; known: {list(LOLO_KEYS)}")
            lolo = LoLOOptions(**lolo)
        self.lolo = lolo or LoLOOptions()
        if total_outer_steps < 1:
            raise ValueError(f"total_outer_steps must be >= 1, got {total_outer_steps}")
        self.total_outer_steps = int(total_outer_steps)
        self.buffer = ReplayBuffer(self.lolo.buffer_size) if self.lolo.buffer_size > 0 else None

    # ------------------------------------------------------------------------- helpers
    def alpha(self, outer_step: int) -> float:
        """α_t of this outer step (1 without behaviour cloning)."""
        if not self.lolo.behaviour_cloning:
            return 1.0
        if self.lolo.alpha is not None:
            return float(self.lolo.alpha)
        return alpha_schedule(outer_step, self.total_outer_steps)

    def _push_step(self, generator: torch.Generator, start: int, length: int) -> int:
        """``N_push ~ Uniform{start, …, length − 1}`` (``length`` is the absolute end step)."""
        return int(torch.randint(start, max(length, start + 1), (), generator=generator))

    def _expert_init(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {f"{kind}/{name}": torch.zeros_like(value) for name, value in params.items() for kind in ("m", "v")}

    # --------------------------------------------------------------------------- state
    def init_state(self, theta: Theta, task_ids: Sequence[int], outer_step: int) -> EstimatorState:
        state = super().init_state(theta, task_ids, outer_step)
        num_tasks = len(task_ids)
        params = {key[len("params/"):]: value for key, value in state.items() if key.startswith("params/")}
        if self.lolo.behaviour_cloning:
            for key, value in self._expert_init(params).items():
                state[f"expert/{key}"] = value
        if self.buffer is not None:
            pushes = []
            for slot, task_id in enumerate(task_ids):
                generator = slot_generator(self.seed, task_id, outer_step, "lolo", 1 << 20)
                pushes.append(self._push_step(generator, 0, int(state["length"][slot])))
            state["lolo/push_step"] = torch.tensor(pushes, dtype=torch.int64)
            state.update(self.buffer.empty_state(self._entry_of(state, 0), num_tasks))
        return state

    def _entry_of(self, state: EstimatorState, slot: int) -> dict[str, Tensor]:
        """The buffer entry of ``slot``'s current state (its first stored copy)."""
        entry = {"step": state["step"][slot].clone()}
        for key, value in state.items():
            if key.startswith(("params/", "opt_state/", "expert/")):
                entry[key] = value[slot, 0].clone()
            elif key.startswith("task/"):
                entry[key] = value[slot].clone()
        return entry

    # ---------------------------------------------------------------------------- plan
    def _start_trajectory(self, state: EstimatorState, slot: int, task_id: int, outer_step: int,
                          t: int) -> tuple[_Reset, int]:
        """PES's start (the same draws), from the buffer head with probability ``1 − P_th``; draws its push step."""
        task, init, length = self._new_trajectory(slot_generator(self.seed, task_id, outer_step, "reset", t))
        if self.buffer is None:
            return _Reset(slot, task, init, total_steps=length), length
        decide = slot_generator(self.seed, task_id, outer_step, "lolo", t)
        use = float(torch.rand((), generator=decide, dtype=torch.float64)) > self.lolo.p_threshold
        head = self.buffer.head(state, slot)  # the queue does not change within a truncation
        entry = head if use and outer_step > 0 and head is not None else None
        if entry is not None:
            task = {key[len("task/"):]: value for key, value in entry.items() if key.startswith("task/")}
        first = int(entry["step"]) if entry is not None else 0
        end = first + length
        return _Reset(slot, task, None if entry is not None else init, step=first, total_steps=length, entry=entry,
                      push_step=self._push_step(decide, first, end)), end

    def _apply_lolo_resets(self, problems: InnerProblems, expert: dict[str, Tensor] | None, items: list[_Reset],
                           members: int) -> tuple[InnerProblems, dict[str, Tensor] | None]:
        rows = torch.cat([torch.arange(item.slot * members, (item.slot + 1) * members) for item in items])
        fresh_params: dict[str, list[Tensor]] = {key: [] for key in problems.params}
        fresh_opt = {name: {key: [] for key in state} for name, state in problems.opt_state.items()}
        fresh_step, fresh_task = [], {key: [] for key in problems.task}
        fresh_expert = {key: [] for key in (expert or {})}
        for item in items:
            if item.entry is None:
                params = item.params
                opt = self.trainer.init_opt_state({key: value.unsqueeze(0) for key, value in params.items()},
                                                  [item.total_steps])
                opt = {name: {key: value[0] for key, value in state.items()} for name, state in opt.items()}
                step = torch.zeros((), dtype=torch.int64)
                exp = self._expert_init(params)
            else:
                params = {key: item.entry[f"params/{key}"] for key in problems.params}
                opt = {name: {key: item.entry[f"opt_state/{name}/{key}"] for key in state}
                       for name, state in problems.opt_state.items()}
                step = item.entry["step"]
                exp = {key: item.entry[f"expert/{key}"] for key in fresh_expert}
            for key in fresh_params:
                fresh_params[key].append(params[key])
            for name, state in fresh_opt.items():
                for key in state:
                    state[key].append(opt[name][key])
            fresh_step.append(step)
            for key in fresh_task:
                fresh_task[key].append(item.task[key])
            for key in fresh_expert:
                fresh_expert[key].append(exp[key])

        def put(value: Tensor, fresh: list[Tensor]) -> Tensor:
            return value.index_put((rows,), torch.stack(fresh).repeat_interleave(members, dim=0).to(value.dtype))

        new = InnerProblems(
            params={key: put(value, fresh_params[key]) for key, value in problems.params.items()},
            opt_state={name: {key: put(value, fresh_opt[name][key]) for key, value in state.items()}
                       for name, state in problems.opt_state.items()},
            step=put(problems.step, fresh_step),
            task={key: put(value, fresh_task[key]) for key, value in problems.task.items()})
        if expert is not None:
            expert = {key: put(value, fresh_expert[key]) for key, value in expert.items()}
        return new, expert

    # ---------------------------------------------------------------------------- step
    def _bc_step(self, theta: Theta, problems: InnerProblems, expert: dict[str, Tensor], batch: Batch,
                 alpha: float) -> tuple[Tensor, Tensor, InnerProblems, dict[str, Tensor]]:
        """One mixed step: ``(loss, L^bc (M,), problems, expert moments)``."""
        loss, grads = self.family.loss_and_grad(problems.params, problems.task, batch)
        deltas, new_state = self.trainer.rule_steps(self.trainer.theta_is_batched(theta), theta, problems.params, grads,
                                                    problems.opt_state, problems.step, loss)
        # the expert: one Adam step of every member from the same parameters, as torch's AdamW takes it
        # (each member row a tensor of its own, at its own step count)
        counts = (problems.step + 1).tolist()
        adam = {name: value.clone() for name, value in problems.params.items()}
        new_expert = {key: value.clone() for key, value in expert.items()}
        names = list(adam)
        adamw_step([row for name in names for row in adam[name].unbind(0)],
                   [row for name in names for row in grads[name].unbind(0)],
                   [row for name in names for row in new_expert[f"m/{name}"].unbind(0)],
                   [row for name in names for row in new_expert[f"v/{name}"].unbind(0)],
                   counts * len(names), lr=self.lolo.expert_lr, betas=ADAM_BETAS, eps=ADAM_EPS)
        new_params = {}
        bc = torch.zeros_like(loss)
        for name, value in problems.params.items():
            lo = value - deltas[name]
            bc = bc + (lo - adam[name]).reshape(lo.shape[0], -1).square().sum(1)
            new_params[name] = lo if alpha == 1.0 else (1.0 - alpha) * adam[name] + alpha * lo
        problems = InnerProblems(params=new_params, opt_state=new_state, step=problems.step + 1, task=problems.task)
        return loss, bc, problems, new_expert

    # ------------------------------------------------------------------- PES's injected parts
    def _unroll_truncation(self, member_theta: Theta, state: EstimatorState, plan: TruncationPlan,
                           outer_step: int) -> _LoLORun:
        """PES's unroll with LoLO's resets (buffer starts), buffer pushes and (with BC) the mixed step."""
        members, num_tasks = self.members_per_task, int(state["step"].shape[0])
        bc_on = self.lolo.behaviour_cloning
        alpha = self.alpha(outer_step)
        expert = None
        if bc_on:
            expert = {}
            for key, value in state.items():
                if key.startswith("expert/"):
                    copies = value.shape[1]
                    expert[key[len("expert/"):]] = value.repeat_interleave(members // copies, dim=1).reshape(
                        num_tasks * members, *value.shape[2:])
        push_step = state["lolo/push_step"].clone() if self.buffer is not None else None
        pending: list[tuple[int, dict[str, Tensor]]] = []
        bcs: list[Tensor] = []

        def before_step(t: int, problems: InnerProblems) -> InnerProblems:
            nonlocal expert
            if t in plan.resets:
                problems, expert = self._apply_lolo_resets(problems, expert, plan.resets[t], members)
                if push_step is not None:
                    for item in plan.resets[t]:
                        push_step[item.slot] = item.push_step
            if push_step is not None:
                steps = problems.step.reshape(num_tasks, members)[:, 0]
                for slot in torch.nonzero(steps == push_step).flatten().tolist():
                    pending.append((slot, self._member_entry(problems, expert, slot * members)))
                    push_step[slot] = -1
            return problems

        def bc_step(theta: Theta, problems: InnerProblems, batch: Batch) -> tuple[Tensor, InnerProblems]:
            nonlocal expert
            assert expert is not None
            loss, bc, problems, expert = self._bc_step(theta, problems, expert, batch, alpha)
            bcs.append(bc)
            return loss, problems

        raw, problems = self._run(member_theta, self._problems_from_state(state, members), plan, members,
                                  before_step=before_step, step=bc_step if bc_on else None)
        extra_state: EstimatorState = {}
        extra_stats: dict[str, float] = {"alpha": alpha}
        if expert is not None:
            for key, value in expert.items():
                extra_state[f"expert/{key}"] = value.reshape(num_tasks, members, *value.shape[1:]).contiguous().clone()
        if self.buffer is not None:
            buffer = {key: value for key, value in state.items() if key.startswith(ReplayBuffer.PREFIX)}
            for slot, entry in pending:
                buffer = self.buffer.push(buffer, slot, entry)
            extra_state.update(buffer)
            extra_state["lolo/push_step"] = push_step
            extra_stats["buffer_starts"] = float(sum(item.entry is not None for items in plan.resets.values()
                                                     for item in items))
            extra_stats["pushes"] = float(len(pending))
            extra_stats["buffer_fill"] = float(buffer[ReplayBuffer.PREFIX + "count"].double().mean())
        return _LoLORun(raw=raw, problems=problems, extra_state=extra_state, extra_stats=extra_stats,
                        bc_loss=torch.stack(bcs) if bc_on else None, alpha=alpha)

    def _meta_signal(self, difference: Tensor, run: TruncationRun, outer_step: int) -> Tensor:
        """``(1−α)·ψ(Δ L^bc) + α·ψ(Δ L^task)`` with behaviour cloning (raw ``Δ L^task`` at α = 1); else PES's."""
        assert isinstance(run, _LoLORun)
        if run.bc_loss is None:
            return difference
        horizon, num_tasks = difference.shape[:2]
        bc_loss = run.bc_loss.reshape(horizon, num_tasks, self.members_per_task)
        if run.alpha < 1.0:
            eps = self.lolo.psi_eps
            bc_difference = bc_loss[..., 0::2] - bc_loss[..., 1::2]
            difference = (1.0 - run.alpha) * psi(bc_difference, 0, eps) + run.alpha * psi(difference, 0, eps)
        run.extra_stats["bc_loss"] = float(bc_loss.double().mean())
        return difference

    def _member_entry(self, problems: InnerProblems, expert: dict[str, Tensor] | None, row: int) -> dict[str, Tensor]:
        entry = {"step": problems.step[row].clone()}
        entry.update({f"params/{key}": value[row].clone() for key, value in problems.params.items()})
        for name, state in problems.opt_state.items():
            entry.update({f"opt_state/{name}/{key}": value[row].clone() for key, value in state.items()})
        entry.update({f"task/{key}": value[row].clone() for key, value in problems.task.items()})
        if expert is not None:
            entry.update({f"expert/{key}": value[row].clone() for key, value in expert.items()})
        return entry


