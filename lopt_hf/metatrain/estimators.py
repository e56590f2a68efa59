"""Meta-gradient estimators: full/truncated BPTT, full/truncated antithetic ES and PES.

Every estimator has the same small interface (:class:`MetaGradientEstimator`)::

    state = estimator.init_state(theta, task_ids, outer_step)
    result = estimator.estimate(theta, state, task_ids, outer_step)   # -> EstimateResult
    state = result.new_state

``task_ids`` are *global* task-slot indices; a process owns a contiguous subset of them and
``state`` holds only its slots (every tensor has a leading axis over them, so slicing
``state`` by slot splits it). ``result.grad_sum`` is the **sum** over the given slots of the
per-task meta-gradients: the outer loop all-reduces it and divides by the total number of
slots. All randomness of a slot (task sample, initialisation, data batches, perturbations,
unroll lengths) comes from generators seeded by ``(seed, global task id, outer step, purpose)``,
so the result does not depend on how slots are spread over processes (up to float rounding
of the sums).

Meta-loss. Each inner step contributes its normalised training loss
(:meth:`TaskFamily.normalized_loss`, measured before the step's update, as in the tutorial).
Full estimators average it over one whole trajectory; truncated estimators average it over
one truncation of ``truncation_length`` steps. Trajectory lengths are drawn log-uniformly from
``[min_unroll, max_unroll]``; a trajectory that reaches its length is reset (a new task,
initialisation and length) inside the truncation. Starts are staggered: a slot's first
trajectory gets a length uniform in ``[1, L]`` so that slots do not reset in lock-step. A
scheduled rule (Celo, VeLO) is told each trajectory's length as its planned number of steps
(``total_steps``: the staggered length for a slot's first one), so its fraction-of-training
features say how far the trajectory actually is.

Perturbations: ``theta ± std * z`` with ``z ~ N(0, I)``, ``num_antithetic`` pairs per task; an
antithetic pair shares its task, initialisation and data. ES estimates are
``mean_pairs (L+ - L-) / (2 std) * z``; PES multiplies the loss difference of the current
trajectory by the *accumulated* ``z`` of that trajectory (accumulators reset with the
trajectory; a truncation that straddles a reset splits its loss difference between the old
trajectory, weighted by the accumulator, and the new one, weighted by the current ``z`` —
Vicol et al. 2021 and the learned-optimizers tutorial's ``vec_short_segment_pes``, here with
the ``1/std`` factor of the unbiased estimator).

State layout (flat ``dict[str, Tensor]``, checkpointable with safetensors or
``torch.save``/``torch.load(weights_only=True)``), ``K`` = number of slots:

* ``step`` (K,) int64 — updates applied in the current trajectory; ``length`` (K,) int64;
* ``task/<key>`` (K, ...) — the task descriptor;
* ``params/<name>`` (K, C, ...) and ``opt_state/<name>/<key>`` (K, C, ...) — the inner
  problems, ``C`` copies per slot (1 for truncated BPTT/ES, ``2 * num_antithetic`` for PES:
  ``[+z_0, -z_0, +z_1, -z_1, ...]``);
* ``pes_accumulator/<theta key>`` (K, num_antithetic, ...) — PES only.

Full-unroll estimators keep no state between calls (``{}``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..rules.base import UpdateRule
from .tasks import Batch, Params, TaskDescriptor, TaskFamily
from .unroll import InnerProblems, InnerStep, VectorizedInnerTrainer, run_unroll, stack_dicts

Theta = dict[str, Tensor]
EstimatorState = dict[str, Tensor]


@dataclasses.dataclass
class EstimateResult:
    """What one :meth:`MetaGradientEstimator.estimate` call returns."""

    grad_sum: dict[str, Tensor]  # SUM over this call's task slots of per-task meta-gradients
    meta_loss_sum: Tensor  # SUM over the slots of per-task meta-losses (scalar)
    num_tasks: int  # number of slots summed (len(task_ids))
    new_state: EstimatorState
    stats: dict[str, float]


@runtime_checkable
class MetaGradientEstimator(Protocol):
    """The interface between estimators and the outer loop."""

    def init_state(self, theta: Theta, task_ids: Sequence[int], outer_step: int) -> EstimatorState:
        """State of the given task slots (only tensors, leading axis over the slots)."""
        ...

    def estimate(self, theta: Theta, state: EstimatorState, task_ids: Sequence[int],
                 outer_step: int) -> EstimateResult:
        """A meta-gradient estimate for the given slots, and their advanced state."""
        ...


# ------------------------------------------------------------------------------- randomness
_PURPOSES = {"init": 1, "reset": 2, "data": 3, "perturbation": 4, "trajectory": 5, "lolo": 6}


def slot_generator(seed: int, task_id: int, outer_step: int, purpose: str, index: int = 0) -> torch.Generator:
    """A CPU generator seeded by ``(seed, task_id, outer_step, purpose, index)``.

    Uses numpy's ``SeedSequence`` hashing, so nearby tuples give unrelated streams.
    """
    words = np.random.SeedSequence([int(seed), int(task_id), int(outer_step), _PURPOSES[purpose],
                                    int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(words[0]) << 32 | int(words[1])) & ((1 << 63) - 1))


# --------------------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class EstimatorOptions:
    """Hyper-parameters shared by all estimators (each ignores those it does not use).

    The one definition of these options: a config's ``estimator:`` section
    (``lopt_hf.metatrain.config.EstimatorSection``) is this class plus the estimator's name and
    task-slot count, so a YAML run and a direct :func:`build_estimator` call share defaults.
    An invalid value raises ``ValueError("<field>: <what is wrong>")``.
    """

    truncation_length: int = 10  # inner steps per estimate (truncated estimators)
    min_unroll: int = 50  # trajectory lengths are log-uniform in [min_unroll, max_unroll]
    max_unroll: int = 100
    std: float = 0.01  # perturbation standard deviation (ES, PES)
    num_antithetic: int = 1  # antithetic pairs per task (ES, PES)
    stagger: bool = True  # first trajectory of each slot gets a length uniform in [1, L]
    compile: bool = True  # Inductor-compiled inner step (see unroll.py); False runs eagerly
    # PES (and LoLO): the meta-loss counts only the inner losses of the last final_fraction of each trajectory
    # (1.0: every step, the trajectory's mean loss; 0.25: its last quarter — "how low does it end", not "how
    # fast does it fall", the question the evaluation asks). PES stays unbiased for this weighted sum.
    final_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.truncation_length < 1:
            raise ValueError(f"truncation_length: must be >= 1, got {self.truncation_length}")
        if not 1 <= self.min_unroll <= self.max_unroll:
            raise ValueError(f"min_unroll: need 1 <= min_unroll <= max_unroll, got {self.min_unroll} and "
                             f"{self.max_unroll}")
        if not self.std > 0:
            raise ValueError(f"std: must be > 0, got {self.std}")
        if self.num_antithetic < 1:
            raise ValueError(f"num_antithetic: must be >= 1, got {self.num_antithetic}")
        if not 0.0 < self.final_fraction <= 1.0:
            raise ValueError(f"final_fraction: must be in (0, 1], got {self.final_fraction}")


class _Estimator:
    """Shared machinery: sampling trajectories, expanding slots to members, bookkeeping."""

    name: ClassVar[str]
    uses_perturbations: ClassVar[bool] = False

    def __init__(self, task_family: TaskFamily, rule: UpdateRule, *, seed: int = 0, frozen: Sequence[str] = (),
                 **options: Any) -> None:
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.family = task_family
        self.rule = rule
        unknown = sorted(set(frozen) - set(rule.theta_shapes()))
        if unknown:
            raise ValueError(f"frozen: {unknown} are not theta keys of rule {rule.name!r}")
        # theta keys held fixed (meta_optimizer.frozen): never perturbed, so ES/PES give them no meta-gradient
        self.frozen = frozenset(frozen)
        self.seed = int(seed)  # every slot's randomness is seeded by (seed, task id, outer step, purpose)
        self.options = EstimatorOptions(**options)
        self.trainer = VectorizedInnerTrainer(task_family, rule, compile=self.options.compile)
        for name in task_family.param_shapes:
            if "/" in name:
                raise ValueError(f"inner parameter names may not contain '/', got {name!r}")

    # members (inner problems) per task slot during an estimate
    @property
    def members_per_task(self) -> int:
        return 2 * self.options.num_antithetic if self.uses_perturbations else 1

    def _check_theta(self, theta: Theta) -> None:
        expected = self.rule.theta_shapes()
        if set(theta) != set(expected):
            raise ValueError(f"theta keys {sorted(theta)} do not match the rule's {sorted(expected)}")
        for key, value in theta.items():
            if tuple(value.shape) != tuple(expected[key]):
                raise ValueError(f"theta[{key!r}] has shape {tuple(value.shape)}, the rule expects {expected[key]}")
            if value.dtype != self.family.dtype:
                raise ValueError(f"theta[{key!r}] is {value.dtype} but the task family computes in "
                                 f"{self.family.dtype}")

    def _sample_length(self, generator: torch.Generator) -> int:
        low, high = self.options.min_unroll, self.options.max_unroll
        if low == high:
            return low
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        return min(high, max(low, int(math.exp(math.log(low) + u * (math.log(high + 1) - math.log(low))))))

    def _segment_batches(self, task_id: int, outer_step: int,
                         segments: list[tuple[int, int, TaskDescriptor]]) -> dict[str, Tensor]:
        """A slot's batches for one truncation: each (first, end, task) segment drawn from its own seed."""
        pieces = [self.family.sample_batches(
            piece_task, slot_generator(self.seed, task_id, outer_step, "data", first), end - first)
            for first, end, piece_task in segments if end > first]
        return {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}

    def _new_trajectory(self, generator: torch.Generator) -> tuple[TaskDescriptor, Params, int]:
        task = self.family.sample_task(generator)
        params = self.family.init_params(task, generator)
        return task, params, self._sample_length(generator)

    def _perturbations(self, theta: Theta, task_ids: Sequence[int], outer_step: int) -> dict[str, Tensor]:
        """``z`` of every slot and pair: key -> (K, num_antithetic, *shape), unit normal (zero for frozen keys,
        drawn all the same, so the other keys' noise does not depend on what is frozen)."""
        per_task = []
        for task_id in task_ids:
            generator = slot_generator(self.seed, task_id, outer_step, "perturbation")
            noise = {key: torch.randn((self.options.num_antithetic, *theta[key].shape), generator=generator,
                                      dtype=torch.float64).to(theta[key].dtype) for key in sorted(theta)}
            per_task.append({key: value.zero_() if key in self.frozen else value for key, value in noise.items()})
        return stack_dicts(per_task)

    def _member_theta(self, theta: Theta, noise: dict[str, Tensor]) -> Theta:
        """``theta ± std * z`` laid out as members ``[+z_0, -z_0, +z_1, ...]`` per slot → (K * 2A, ...)."""
        signs = torch.tensor([1.0, -1.0], dtype=next(iter(theta.values())).dtype)
        members = {}
        for key, value in theta.items():
            z = noise[key]  # (K, A, *shape)
            signed = z.unsqueeze(2) * signs.reshape(1, 1, 2, *([1] * value.dim()))
            members[key] = (value + self.options.std * signed).reshape(-1, *value.shape)
        return members

    @staticmethod
    def _batches_by_step(data: dict[str, Tensor], members: int) -> Callable[[int], Batch]:
        """``batch_at(t)`` for :func:`run_unroll` from per-slot data ``(T, K, ...)``: each slot's batch for every
        one of its ``members``, ``(M, ...)`` (expanded once for all steps, not per step)."""
        expanded = {key: value.repeat_interleave(members, dim=1) for key, value in data.items()}  # (T, M, ...)
        return lambda t: {key: value[t] for key, value in expanded.items()}

    def _stats(self, normalized: Tensor, raw: Tensor, grad_sum: dict[str, Tensor], num_tasks: int,
               mask: Tensor | None = None, **extra: float) -> dict[str, float]:
        """Per-call statistics (the same keys on every call of an estimator, so they can be all-reduced).

        ``raw`` is (T, K, P) or (T, M); ``mask`` (T, K) marks the steps that count (full unrolls
        pad shorter trajectories to the longest one).
        """
        raw = raw.detach().double().reshape(raw.shape[0], num_tasks, -1)
        weights = torch.ones(raw.shape[:2], dtype=raw.dtype) if mask is None else mask.double()
        weights = weights.unsqueeze(-1).expand_as(raw)
        finite = torch.isfinite(raw)
        grad_norm = math.sqrt(sum(float(value.double().square().sum()) for value in grad_sum.values()))
        stats = {"meta_loss": float(normalized.detach().double().mean()),
                 "inner_loss": float((torch.where(finite, raw, 0.0) * weights).sum() / (weights * finite).sum()
                                     .clamp_min(1.0)),
                 "nonfinite_losses": float(((~finite) * weights).sum()),
                 "inner_steps": float(weights.sum()),
                 "grad_norm": grad_norm / max(num_tasks, 1)}
        stats.update({key: float(value) for key, value in extra.items()})
        return stats


# ------------------------------------------------------------------------------ full unrolls
class _FullUnrollEstimator(_Estimator):
    """Fresh trajectories every call, unrolled to their end; no state between calls."""

    def init_state(self, theta: Theta, task_ids: Sequence[int], outer_step: int) -> EstimatorState:
        self._check_theta(theta)
        return {}

    def _trajectories(self, task_ids: Sequence[int], outer_step: int):
        """Tasks, params, lengths and data (padded to the longest length) of this call's trajectories."""
        tasks, params, lengths, batches = [], [], [], []
        for task_id in task_ids:
            generator = slot_generator(self.seed, task_id, outer_step, "trajectory")
            task, init, length = self._new_trajectory(generator)
            data = self.family.sample_batches(
                task, slot_generator(self.seed, task_id, outer_step, "data"), length)
            tasks.append(task)
            params.append(init)
            lengths.append(length)
            batches.append(data)
        longest = max(lengths)
        # Steps past a trajectory's end are masked out; repeat its last batch to fill them.
        padded = [{key: torch.cat([value, value[-1:].expand(longest - length, *value.shape[1:])])
                   for key, value in data.items()} for data, length in zip(batches, lengths)]
        data = {key: torch.stack([item[key] for item in padded], dim=1) for key in padded[0]}  # (T, K, ...)
        return tasks, params, torch.tensor(lengths), data, longest

    def _unroll(self, theta: Theta, task_ids: Sequence[int], outer_step: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(normalised losses (T, K, P), raw losses, mask (T, K))`` of full trajectories under ``theta``."""
        members = self.members_per_task
        tasks, params, lengths, data, longest = self._trajectories(task_ids, outer_step)
        problems = self.trainer.init_problems(
            [task for task in tasks for _ in range(members)], [init for init in params for _ in range(members)],
            [length for length in lengths for _ in range(members)])
        raw, _ = run_unroll(self.trainer, theta, problems, self._batches_by_step(data, members), longest)
        raw = raw.reshape(longest, len(task_ids), members)
        mask = (torch.arange(longest).unsqueeze(1) < lengths.unsqueeze(0)).to(raw.dtype)  # (T, K)
        return self.family.normalized_loss(raw), raw, mask

    @staticmethod
    def _trajectory_means(normalized: Tensor, mask: Tensor) -> Tensor:
        """Per-member mean over each trajectory's own steps → (K, P)."""
        return (normalized * mask.unsqueeze(-1)).sum(0) / mask.sum(0).unsqueeze(-1)


class FullBPTT(_FullUnrollEstimator):
    """Exact gradient of the full-trajectory meta-loss by backpropagation through the unroll."""

    name = "full_bptt"

    def estimate(self, theta: Theta, state: EstimatorState, task_ids: Sequence[int],
                 outer_step: int) -> EstimateResult:
        self._check_theta(theta)
        leaves = {key: value.detach().requires_grad_(True) for key, value in theta.items()}
        with torch.enable_grad():
            normalized, raw, mask = self._unroll(leaves, task_ids, outer_step)
            per_task = self._trajectory_means(normalized, mask)[:, 0]
            total = per_task.sum()
            grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
        grad_sum, nonfinite = _finite_grads(leaves, grads)
        return EstimateResult(grad_sum=grad_sum, meta_loss_sum=total.detach(), num_tasks=len(task_ids), new_state={},
                              stats=self._stats(per_task, raw, grad_sum, len(task_ids), mask,
                                                nonfinite_grad=nonfinite, mean_unroll=float(mask.sum(0).mean())))


class FullES(_FullUnrollEstimator):
    """Antithetic evolution strategies on the full-trajectory meta-loss."""

    name = "es"
    uses_perturbations = True

    @torch.no_grad()
    def estimate(self, theta: Theta, state: EstimatorState, task_ids: Sequence[int],
                 outer_step: int) -> EstimateResult:
        self._check_theta(theta)
        noise = self._perturbations(theta, task_ids, outer_step)
        normalized, raw, mask = self._unroll(self._member_theta(theta, noise), task_ids, outer_step)
        per_member = self._trajectory_means(normalized, mask)  # (K, 2A)
        difference = per_member[:, 0::2] - per_member[:, 1::2]  # (K, A)
        grad_sum = _es_grad_sum(difference, noise, self.options.std)
        meta_loss_sum = per_member.mean(1).sum()
        return EstimateResult(grad_sum=grad_sum, meta_loss_sum=meta_loss_sum, num_tasks=len(task_ids), new_state={},
                              stats=self._stats(per_member, raw, grad_sum, len(task_ids), mask,
                                                mean_unroll=float(mask.sum(0).mean())))


def _es_grad_sum(difference: Tensor, directions: dict[str, Tensor], std: float) -> dict[str, Tensor]:
    """``sum_k mean_a difference[k, a] / (2 std) * directions[k, a]``."""
    weights = difference / (2.0 * std) / difference.shape[1]  # (K, A)
    return {key: torch.tensordot(weights, value, dims=([0, 1], [0, 1])) for key, value in directions.items()}


def _finite_grads(leaves: Theta, grads: Sequence[Tensor | None]) -> tuple[dict[str, Tensor], float]:
    """Gradients with ``None`` → 0; non-finite entries zeroed (their count is returned)."""
    out, nonfinite = {}, 0
    for (key, leaf), grad in zip(leaves.items(), grads):
        grad = torch.zeros_like(leaf) if grad is None else grad.detach()
        bad = ~torch.isfinite(grad)
        nonfinite += int(bad.sum())
        out[key] = torch.where(bad, torch.zeros_like(grad), grad)
    return out, float(nonfinite)


# -------------------------------------------------------------------------- truncated unrolls
@dataclasses.dataclass
class TrajectoryStart:
    """A trajectory that starts inside a truncation: in ``slot``, on ``task``, at inner step ``step``."""

    slot: int
    task: TaskDescriptor
    params: Params | None  # its fresh initialisation (None: it resumes a stored state, see LoLO's buffer)
    step: int = 0
    # its planned number of inner steps (a fresh start's drawn length): a scheduled rule's total_steps
    total_steps: int = 0


@dataclasses.dataclass
class TruncationPlan:
    """Everything about one truncation that is decided before running it."""

    data: dict[str, Tensor]  # (T, K, ...)
    resets: dict[int, list[TrajectoryStart]]  # step t -> the trajectories starting before step t
    same_trajectory: Tensor  # (T, K) bool: step t still belongs to the trajectory the truncation began in
    reset_any: Tensor  # (K,) bool: some trajectory ended inside the truncation
    final_length: Tensor  # (K,) int64: length of the trajectory each slot is in at the end
    progress: Tensor  # (T, K) float: steps done ÷ length of the trajectory step t belongs to, before step t


@dataclasses.dataclass
class TruncationRun:
    """What the inner steps of one PES truncation produced (see ``PES._unroll_truncation``)."""

    raw: Tensor  # (T, M) inner losses, each before its step's update
    problems: InnerProblems  # the members after the truncation
    extra_state: EstimatorState = dataclasses.field(default_factory=dict)  # state entries beside PES's own
    extra_stats: dict[str, float] = dataclasses.field(default_factory=dict)


class _TruncatedEstimator(_Estimator):
    """Persistent inner problems advanced ``truncation_length`` steps per estimate."""

    @property
    def stored_copies(self) -> int:
        """Inner-problem copies kept per slot between calls."""
        return 1

    # ------------------------------------------------------------------------------- state
    def init_state(self, theta: Theta, task_ids: Sequence[int], outer_step: int) -> EstimatorState:
        self._check_theta(theta)
        copies = self.stored_copies
        tasks, params, lengths = [], [], []
        for task_id in task_ids:
            generator = slot_generator(self.seed, task_id, outer_step, "init")
            task, init, length = self._new_trajectory(generator)
            if self.options.stagger:
                length = int(torch.randint(1, length + 1, (), generator=generator))
            tasks.append(task)
            params.append(init)
            lengths.append(length)
        problems = self.trainer.init_problems([task for task in tasks for _ in range(copies)],
                                              [init for init in params for _ in range(copies)],
                                              [length for length in lengths for _ in range(copies)])
        state = self._state_from_problems(problems, torch.tensor(lengths, dtype=torch.int64), len(task_ids))
        state.update(self._extra_init_state(theta, len(task_ids)))
        return state

    def _extra_init_state(self, theta: Theta, num_tasks: int) -> EstimatorState:
        return {}

    def _state_from_problems(self, problems: InnerProblems, lengths: Tensor, num_tasks: int) -> EstimatorState:
        """Flat checkpointable state from ``K * C`` members (C = stored copies)."""
        copies = problems.num_members // num_tasks

        def per_copy(value: Tensor) -> Tensor:
            return value.detach().reshape(num_tasks, copies, *value.shape[1:]).contiguous().clone()

        def per_slot(value: Tensor) -> Tensor:  # members of a slot agree: keep the first
            return value.detach().reshape(num_tasks, copies, *value.shape[1:])[:, 0].contiguous().clone()

        state: EstimatorState = {"step": per_slot(problems.step), "length": lengths.clone()}
        state.update({f"task/{key}": per_slot(value) for key, value in problems.task.items()})
        state.update({f"params/{key}": per_copy(value) for key, value in problems.params.items()})
        for name, rule_state in problems.opt_state.items():
            state.update({f"opt_state/{name}/{key}": per_copy(value) for key, value in rule_state.items()})
        return state

    def _problems_from_state(self, state: EstimatorState, members: int) -> InnerProblems:
        """``K * members`` problems: each stored copy repeated to fill the members of its slot."""
        num_tasks = int(state["step"].shape[0])
        params, opt_state, task = {}, {}, {}
        for key, value in state.items():
            if key.startswith(("params/", "opt_state/")):
                copies = value.shape[1]
                if members != copies:  # (PES stores every member: no copy to make)
                    value = value.repeat_interleave(members // copies, dim=1)
                value = value.reshape(num_tasks * members, *value.shape[2:])
                if key.startswith("params/"):
                    params[key[len("params/"):]] = value
                else:
                    name, state_key = key[len("opt_state/"):].split("/", 1)
                    opt_state.setdefault(name, {})[state_key] = value
            elif key.startswith("task/"):
                task[key[len("task/"):]] = value.repeat_interleave(members, dim=0)
        missing = set(self.family.param_shapes) - set(params)
        if missing:
            raise ValueError(f"estimator state lacks params/{sorted(missing)}; was it made by another task family?")
        return InnerProblems(params=params, opt_state=opt_state,
                             step=state["step"].repeat_interleave(members, dim=0), task=task)

    def _check_state(self, state: EstimatorState, task_ids: Sequence[int]) -> None:
        if "step" not in state or "length" not in state:
            raise ValueError(f"{self.name} state needs 'step' and 'length'; got keys {sorted(state)[:8]}...")
        if int(state["step"].shape[0]) != len(task_ids):
            raise ValueError(f"state holds {int(state['step'].shape[0])} task slots but {len(task_ids)} task ids "
                             "were given")

    # ------------------------------------------------------------------------------- plan
    def _plan(self, state: EstimatorState, task_ids: Sequence[int], outer_step: int) -> TruncationPlan:
        """Decide resets and draw data for this truncation, slot by slot (cheap Python work)."""
        horizon = self.options.truncation_length
        tasks = {key[len("task/"):]: value for key, value in state.items() if key.startswith("task/")}
        resets: dict[int, list[TrajectoryStart]] = {}
        same = torch.ones(horizon, len(task_ids), dtype=torch.bool)
        progress = torch.zeros(horizon, len(task_ids), dtype=torch.float32)
        final_length, per_slot_data = [], []
        for slot, task_id in enumerate(task_ids):
            step, length = int(state["step"][slot]), int(state["length"][slot])
            task = {key: value[slot] for key, value in tasks.items()}
            segments = []  # (first step, end step, task) of each trajectory piece in this truncation
            start = 0
            for t in range(horizon):
                if step >= length:
                    segments.append((start, t, task))
                    begun, length = self._start_trajectory(state, slot, task_id, outer_step, t)
                    resets.setdefault(t, []).append(begun)
                    task, step, start = begun.task, begun.step, t
                    if len(segments) == 1:
                        same[t:, slot] = False
                progress[t, slot] = step / length
                step += 1
            segments.append((start, horizon, task))
            per_slot_data.append(self._segment_batches(task_id, outer_step, segments))
            final_length.append(length)
        data = {key: torch.stack([item[key] for item in per_slot_data], dim=1) for key in per_slot_data[0]}
        return TruncationPlan(data=data, resets=resets, same_trajectory=same, reset_any=~same[-1],
                              final_length=torch.tensor(final_length, dtype=torch.int64), progress=progress)

    def _start_trajectory(self, state: EstimatorState, slot: int, task_id: int, outer_step: int,
                          t: int) -> tuple[TrajectoryStart, int]:
        """The trajectory ``slot`` starts before step ``t`` (a fresh task and initialisation) and its end step."""
        task, init, length = self._new_trajectory(slot_generator(self.seed, task_id, outer_step, "reset", t))
        return TrajectoryStart(slot, task, init, total_steps=length), length

    def _run(self, theta: Theta, problems: InnerProblems, plan: TruncationPlan, members: int, *,
             before_step: Callable[[int, InnerProblems], InnerProblems] | None = None,
             step: InnerStep | None = None) -> tuple[Tensor, InnerProblems]:
        """Unroll the truncation with the plan's data; raw losses (T, M).

        ``before_step`` (default: the plan's resets of finished trajectories) and ``step`` (default:
        the learned optimizer's vectorised step) may be replaced (LoLO: buffer starts, behaviour cloning).
        """

        def apply_resets(t: int, current: InnerProblems) -> InnerProblems:
            if t not in plan.resets:
                return current
            return self._apply_resets(current, plan.resets[t], members)

        return run_unroll(self.trainer, theta, problems, self._batches_by_step(plan.data, members),
                          self.options.truncation_length,
                          before_step or apply_resets, step=step)

    def _apply_resets(self, problems: InnerProblems, resets: list[TrajectoryStart],
                      members: int) -> InnerProblems:
        """Members of the reset slots restart from a fresh task and initialisation.

        Only the affected rows are written (``index_put``, out of place so that autograd and
        the caller's tensors are safe); resets are rare, the other rows are copied as they are.
        """
        rows = torch.cat([torch.arange(item.slot * members, (item.slot + 1) * members) for item in resets])

        def fresh_rows(values: list[Tensor]) -> Tensor:
            return torch.stack(values).repeat_interleave(members, dim=0)

        fresh_params = {key: fresh_rows([item.params[key] for item in resets]) for key in problems.params}
        fresh_state = self.trainer.init_opt_state(fresh_params,
                                                  [item.total_steps for item in resets for _ in range(members)])
        fresh_task = {key: fresh_rows([item.task[key] for item in resets]) for key in problems.task}

        def put(value: Tensor, fresh: Tensor) -> Tensor:
            return value.index_put((rows,), fresh.to(value.dtype))

        return InnerProblems(
            params={key: put(value, fresh_params[key]) for key, value in problems.params.items()},
            opt_state={name: {key: put(value, fresh_state[name][key]) for key, value in state.items()}
                       for name, state in problems.opt_state.items()},
            step=put(problems.step, torch.zeros(len(rows), dtype=problems.step.dtype)),
            task={key: put(value, fresh_task[key]) for key, value in problems.task.items()})

    def _reset_stats(self, plan: TruncationPlan, state: EstimatorState) -> dict[str, float]:
        return {"resets": float(sum(len(items) for items in plan.resets.values())),
                "mean_trajectory_step": float(state["step"].double().mean())}


class TruncatedBPTT(_TruncatedEstimator):
    """Backpropagation through one truncation, the incoming state treated as constant (biased)."""

    name = "truncated_bptt"

    def estimate(self, theta: Theta, state: EstimatorState, task_ids: Sequence[int],
                 outer_step: int) -> EstimateResult:
        self._check_theta(theta)
        self._check_state(state, task_ids)
        plan = self._plan(state, task_ids, outer_step)
        problems = self._problems_from_state(state, 1)
        leaves = {key: value.detach().requires_grad_(True) for key, value in theta.items()}
        with torch.enable_grad():
            raw, problems = self._run(leaves, problems, plan, 1)
            normalized = self.family.normalized_loss(raw)  # (T, K)
            total = normalized.mean(0).sum()
            grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
        grad_sum, nonfinite = _finite_grads(leaves, grads)
        new_state = self._state_from_problems(problems, plan.final_length, len(task_ids))
        return EstimateResult(grad_sum=grad_sum, meta_loss_sum=total.detach(), num_tasks=len(task_ids),
                              new_state=new_state,
                              stats=self._stats(normalized, raw, grad_sum, len(task_ids),
                                                nonfinite_grad=nonfinite, **self._reset_stats(plan, state)))


class TruncatedES(_TruncatedEstimator):
    """Antithetic ES on one truncation from a shared state (biased); continues from the ``+z_0`` copy."""

    name = "truncated_es"
    uses_perturbations = True

    @torch.no_grad()
    def estimate(self, theta: Theta, state: EstimatorState, task_ids: Sequence[int],
                 outer_step: int) -> EstimateResult:
        self._check_theta(theta)
        self._check_state(state, task_ids)
        members, num_tasks = self.members_per_task, len(task_ids)
        plan = self._plan(state, task_ids, outer_step)
        noise = self._perturbations(theta, task_ids, outer_step)
        raw, problems = self._run(self._member_theta(theta, noise), self._problems_from_state(state, members),
                                  plan, members)
        normalized = self.family.normalized_loss(raw).reshape(-1, num_tasks, members)  # (T, K, 2A)
        per_member = normalized.mean(0)
        grad_sum = _es_grad_sum(per_member[:, 0::2] - per_member[:, 1::2], noise, self.options.std)
        kept = problems.map(lambda value: value.reshape(num_tasks, members, *value.shape[1:])[:, :1]
                            .reshape(num_tasks, *value.shape[1:]))
        return EstimateResult(grad_sum=grad_sum, meta_loss_sum=per_member.mean(1).sum(), num_tasks=num_tasks,
                              new_state=self._state_from_problems(kept, plan.final_length, num_tasks),
                              stats=self._stats(normalized, raw, grad_sum, num_tasks, **self._reset_stats(plan, state)))


class PES(_TruncatedEstimator):
    """Persistent evolution strategies: unbiased for the full-trajectory meta-loss."""

    name = "pes"
    uses_perturbations = True

    @property
    def stored_copies(self) -> int:
        return self.members_per_task  # the + and - trajectories persist separately

    def _extra_init_state(self, theta: Theta, num_tasks: int) -> EstimatorState:
        return {f"pes_accumulator/{key}": torch.zeros((num_tasks, self.options.num_antithetic, *value.shape),
                                                      dtype=value.dtype)
                for key, value in theta.items()}

    def _unroll_truncation(self, member_theta: Theta, state: EstimatorState, plan: TruncationPlan,
                           outer_step: int) -> TruncationRun:
        """Run this truncation's inner steps for every member (the part subclasses such as LoLO replace)."""
        members = self.members_per_task
        raw, problems = self._run(member_theta, self._problems_from_state(state, members), plan, members)
        return TruncationRun(raw=raw, problems=problems)

    def _meta_signal(self, difference: Tensor, run: TruncationRun, outer_step: int) -> Tensor:
        """The per-step signal PES aggregates (T, K, A): here the normalised loss difference ``L+ − L−``."""
        return difference

    @torch.no_grad()
    def estimate(self, theta: Theta, state: EstimatorState, task_ids: Sequence[int],
                 outer_step: int) -> EstimateResult:
        self._check_theta(theta)
        self._check_state(state, task_ids)
        members, num_tasks = self.members_per_task, len(task_ids)
        horizon = self.options.truncation_length
        plan = self._plan(state, task_ids, outer_step)
        noise = self._perturbations(theta, task_ids, outer_step)
        run = self._unroll_truncation(self._member_theta(theta, noise), state, plan, outer_step)
        raw, problems = run.raw, run.problems
        normalized = self.family.normalized_loss(raw).reshape(horizon, num_tasks, members)
        difference = self._meta_signal(normalized[..., 0::2] - normalized[..., 1::2], run, outer_step)  # (T, K, A)
        if self.options.final_fraction < 1.0:  # only the trajectories' last stretch counts
            counted = plan.progress >= 1.0 - self.options.final_fraction  # (T, K)
            difference = difference * counted.to(difference.dtype).unsqueeze(-1)
        same = plan.same_trajectory.to(difference.dtype).unsqueeze(-1)  # (T, K, 1)
        # Loss differences of the trajectory this truncation continued see every perturbation
        # of that trajectory (the accumulator); those of trajectories started inside it only z.
        old_part = (difference * same).sum(0) / horizon  # (K, A)
        new_part = (difference * (1.0 - same)).sum(0) / horizon
        accumulated = {key: state[f"pes_accumulator/{key}"] + noise[key] for key in theta}
        from_trajectory = _es_grad_sum(old_part, accumulated, self.options.std)
        from_new = _es_grad_sum(new_part, noise, self.options.std)
        grad_sum = {key: from_trajectory[key] + from_new[key] for key in theta}
        new_state = self._state_from_problems(problems, plan.final_length, num_tasks)
        for key, value in accumulated.items():  # a new trajectory's accumulator starts at its first z
            new_state[f"pes_accumulator/{key}"] = torch.where(_broadcast_mask(plan.reset_any, value), noise[key],
                                                              value).contiguous()
        new_state.update(run.extra_state)
        per_member = normalized.mean(0)
        return EstimateResult(grad_sum=grad_sum, meta_loss_sum=per_member.mean(1).sum(), num_tasks=num_tasks,
                              new_state=new_state,
                              stats=self._stats(normalized, raw, grad_sum, num_tasks, **self._reset_stats(plan, state),
                                                **run.extra_stats))


def _broadcast_mask(mask: Tensor, like: Tensor) -> Tensor:
    """``mask`` (K,) reshaped to broadcast against ``like`` (K, ...)."""
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


ESTIMATORS: dict[str, type[_Estimator]] = {
    FullBPTT.name: FullBPTT,
    TruncatedBPTT.name: TruncatedBPTT,
    FullES.name: FullES,
    TruncatedES.name: TruncatedES,
    PES.name: PES,
}


def build_estimator(name: str, task_family: TaskFamily, rule: UpdateRule, **options: Any) -> MetaGradientEstimator:
    """The estimator ``name`` (full_bptt, truncated_bptt, es, truncated_es, pes).

    ``options``: ``seed``, ``frozen`` (theta keys never perturbed) and any :class:`EstimatorOptions` field
    (truncation_length, min_unroll, max_unroll, std, num_antithetic, stagger, compile, final_fraction);
    unknown names are an error, options an estimator does not use are ignored.
    """
    try:
        estimator_class = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; available: {sorted(ESTIMATORS)}") from None
    known = {"seed", "frozen"} | {field.name for field in dataclasses.fields(EstimatorOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown estimator option(s) {unknown}; known: {sorted(known)}")
    return estimator_class(task_family, rule, **options)
