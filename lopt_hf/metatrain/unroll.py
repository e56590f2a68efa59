"""Vectorised inner training: many inner problems advance together in batched tensor ops.

All problems — tasks × antithetic perturbations — share one leading *member* axis ``M``. One
inner step is

1. the task family's batched loss and gradient (``TaskFamily.loss_and_grad``:
   ``torch.func.vmap(grad_and_value(loss))``, whose matmuls become ``bmm`` over members), then
2. for every parameter tensor, the update rule's own ``update`` under ``torch.func.vmap`` over
   ``(theta, param, grad, state, step)`` — the rule code unchanged, called once on the whole
   batched tensor (``chunk_size=None``). ``theta`` is either shared (one copy, ES-free
   estimators) or per member (leading ``M`` axis: perturbed copies). A rule that declares
   ``needs_loss`` also gets each member's batch loss from 1. (before the update, as
   ``LearnedOptimizer`` gives it) as its ``loss`` keyword — through a wrapper that takes it
   positionally, since ``vmap`` batches positional arguments only — so it works with every
   estimator; under autograd (BPTT) the loss stays on the graph, like the gradient.

**Scheduled rules** (``rule.scheduled``: Celo, Celo-Adam, VeLO; see :mod:`lopt_hf.rules.scheduler`)
add a whole-model phase between 1. and 2., composed exactly as ``LearnedOptimizer`` composes it:
``tensor_summary`` of every tensor (vmapped over members, stacked ``(M, T, F)``), then one
``schedule`` per member (vmapped; ``theta`` shared or per member as for ``update``) with the
member's loss of this step, its step count for every tensor and the tensors' LSTM rows
(``schedule_tensor_keys``), then each tensor's ``update(..., control=controls[:, i])`` with the new
rows merged into the tensor's state. The whole-model state (``rule.init_schedule_state``: iteration,
planned number of steps, loss buffer) is one more entry of each member's ``opt_state``, under the
reserved name :data:`SCHEDULE_STATE` (no inner parameter may have it), so the estimators' resets,
selects, maps, LoLO's replay buffer and checkpoints carry it like any per-tensor state.
:meth:`VectorizedInnerTrainer.init_opt_state` makes it from each member's ``total_steps``: the
length of the trajectory the member starts (estimators pass the length they drew for it — as
learned_optimization, which Celo was meta-trained with, initialises the optimizer with the
trajectory's own length), so the fraction-of-training features reach 1 where the trajectory ends.

Everything is differentiable in ``theta`` when autograd is on (BPTT estimators).

**Compiled path** (``compile=True``, steps without autograd). Under vmap the rules'
per-element MLPs become ``bmm`` calls with a tiny inner dimension (``[p, m, g, 1] @ W0`` has
K = 4) or a tiny output (``hidden @ W1`` has 2 columns): a poor fit for BLAS, and the
``(M, n, hidden)`` activations make them memory-bound. The step is therefore traced with
``make_fx`` into an aten graph in which such *skinny* matmuls are rewritten as broadcast
products (K ≤ 8: an unrolled sum of outer products; ≤ 4 output columns: one multiply-and-reduce
over K per column), products with a narrow result (a task model's 10-class output layer and its weight
gradient) are computed transposed (:func:`narrow_matmul`: BLAS is several times faster for the wide
result), and the graph is compiled by Inductor, which fuses the per-element MLP
into one loop vectorised over elements that never writes the hidden activations. Measured on
the 2-core reference machine: the per_param_mlp per-element MLP over 64 members × 8,192
elements ≈ 76 ms as two ``bmm`` calls, ≈ 3 ms fused; the tutorial's PES outer step (32 tasks ×
2 members × 10 steps) ≈ 0.94 s eager, 0.09–0.10 s compiled (README, Meta-training: Speed). Same math, a
different execution (rounding differs); ``tests/metatrain/test_metatrain_unroll.py`` checks that both paths agree.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import vmap

from ..kernels.inductor_graphs import InductorGraphs
from ..rules.base import UpdateRule
from ..rules.features import CONTRACTED_SKINNY_COMPILE_OPTIONS, NARROW_COLUMNS, skinny_matmul
from .tasks import Batch, Params, TaskDescriptor, TaskFamily

aten = torch.ops.aten


def narrow_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D or batched) whose result has fewer than :data:`NARROW_COLUMNS` columns and at least
    that many rows, computed as ``(bᵀ aᵀ)ᵀ``; any other product is ``NotImplemented`` (left to aten).

    Such narrow results are a task model's output layer and its weight gradient (10 classes), batched over
    members by vmap. MKL's kernels for them are several times slower than for the transposed product,
    whose result is wide: on the 2-core reference machine, 64 × (128×128 @ 128×10) took 0.75 ms as
    written and 0.19 ms transposed; over 64 × (m×k @ k×n), m 32–512, k 64–256, the transposed form was
    1.8–5× faster for n = 5–10, equal from n = 16 (2-D products: 1.1–2.8× for n = 5–10). The same sums of
    products (each result element is one dot product; its summation order is BLAS's choice either way).
    """
    rows, columns = a.shape[-2], b.shape[-1]
    if not columns < NARROW_COLUMNS <= rows:  # the transposed product is never narrow itself: no recursion
        return NotImplemented
    return torch.matmul(b.transpose(-1, -2), a.transpose(-1, -2)).transpose(-1, -2)


def inner_step_matmul(a: Tensor, b: Tensor) -> Tensor:
    """The compiled inner step's matrix products: a per-element network's skinny ones as broadcast products
    (:func:`~lopt_hf.rules.features.skinny_matmul`), narrow results transposed (:func:`narrow_matmul`), the
    rest as they are (``NotImplemented``)."""
    product = skinny_matmul(a, b)
    return narrow_matmul(a, b) if product is NotImplemented else product


# The compiled inner step rewrites the vmapped mm/bmm the trace sees (:func:`inner_step_matmul`) and compiles
# with the Inductor options skinny products fuse best under, multiply-adds contracted (rules/features.py's, which
# LearnedOptimizer(compile=True) uses for per_param_mlp too).
SKINNY_DECOMPOSITIONS = {aten.mm.default: inner_step_matmul, aten.bmm.default: inner_step_matmul}

# The opt_state entry holding a scheduled rule's whole-model state. "@" cannot occur in a Python
# attribute name (so in no nn.Module parameter name) nor does it split the estimator state's
# ``opt_state/<name>/<key>`` keys; the trainer refuses a task family that uses it anyway.
SCHEDULE_STATE = "@schedule"


@dataclasses.dataclass
class InnerProblems:
    """``M`` inner problems in lock-step; every tensor has a leading member axis ``M``."""

    params: Params  # name -> (M, *shape)
    opt_state: dict[str, dict[str, Tensor]]  # param name -> rule state key -> (M, ...)
    step: Tensor  # (M,) int64: updates applied in the current trajectory (the rule's step)
    task: TaskDescriptor  # key -> (M, ...)

    @property
    def num_members(self) -> int:
        return int(self.step.shape[0])

    def select(self, mask: Tensor, other: "InnerProblems") -> "InnerProblems":
        """Members where ``mask`` (M,) is true from ``other``, the rest from ``self``."""

        def pick(mine: Tensor, theirs: Tensor) -> Tensor:
            return torch.where(mask.reshape(-1, *([1] * (mine.dim() - 1))), theirs, mine)

        return InnerProblems(
            params={key: pick(value, other.params[key]) for key, value in self.params.items()},
            opt_state={name: {key: pick(value, other.opt_state[name][key]) for key, value in state.items()}
                       for name, state in self.opt_state.items()},
            step=pick(self.step, other.step),
            task={key: pick(value, other.task[key]) for key, value in self.task.items()})

    def map(self, fn: Callable[[Tensor], Tensor]) -> "InnerProblems":
        """Apply ``fn`` to every tensor (e.g. ``detach``, ``repeat_interleave``)."""
        return InnerProblems(params={key: fn(value) for key, value in self.params.items()},
                             opt_state={name: {key: fn(value) for key, value in state.items()}
                                        for name, state in self.opt_state.items()},
                             step=fn(self.step), task={key: fn(value) for key, value in self.task.items()})


# One inner step of every member: (theta, problems, batch) -> (loss (M,) before the update, problems after it).
InnerStep = Callable[[dict[str, Tensor], "InnerProblems", Batch], tuple[Tensor, "InnerProblems"]]


def stack_dicts(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """``[{k: t}, ...]`` → ``{k: stack(t)}``."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class VectorizedInnerTrainer:
    """Runs inner steps of ``family`` problems with ``rule`` for all members at once.

    ``compile=True`` uses the traced, skinny-matmul-rewritten, Inductor-compiled step for steps
    taken without autograd (ES, PES: the bulk of meta-training compute); one compilation per
    input signature, cached on this object, the first call of each takes seconds (Inductor
    also caches on disk). Steps under autograd (BPTT) always run eagerly: differentiating
    through an Inductor graph would add a second compilation per signature and a separate
    numerical path for little gain at these sizes. ``compile=False`` runs everything eagerly.
    """

    def __init__(self, family: TaskFamily, rule: UpdateRule, compile: bool = False) -> None:
        self.family = family
        self.rule = rule
        self.compile = bool(compile)
        self._compiled: dict[bool, InductorGraphs] = {}  # by whether theta is per member
        self._theta_dims = {key: len(shape) for key, shape in rule.theta_shapes().items()}
        if rule.scheduled and SCHEDULE_STATE in family.param_shapes:
            raise ValueError(f"inner parameter name {SCHEDULE_STATE!r} is reserved for the whole-model state of "
                             f"scheduled rules such as {rule.name!r}")

    # ----------------------------------------------------------------------------- building
    def init_problems(self, tasks: list[TaskDescriptor], params: list[Params],
                      total_steps: Sequence[int] | None = None) -> InnerProblems:
        """Fresh problems (step 0, the rule's initial state) from per-member tasks and parameters.

        ``total_steps``: each member's planned number of inner steps (needed by scheduled rules only,
        see :meth:`init_opt_state`).
        """
        stacked = stack_dicts(params)
        return InnerProblems(params=stacked, opt_state=self.init_opt_state(stacked, total_steps),
                             step=torch.zeros(len(params), dtype=torch.int64), task=stack_dicts(tasks))

    def init_opt_state(self, params: Params, total_steps: Sequence[int] | None = None) -> dict[str, dict[str, Tensor]]:
        """The rule's initial state for every (batched) parameter tensor.

        A scheduled rule also gets its whole-model state (:data:`SCHEDULE_STATE`), one per member,
        planned for ``total_steps[m]`` inner steps (one int per member; required for such rules,
        ignored by the others).
        """
        # One vmap over all tensors: vmap's per-call cost (≈ 0.2 ms) dominates for zero states, and the
        # estimators call this at every reset.
        state = vmap(self._init_states)(params)
        if self.rule.scheduled:
            members = int(next(iter(params.values())).shape[0])
            if total_steps is None or len(total_steps) != members:
                raise ValueError(f"rule {self.rule.name!r} is scheduled: init_opt_state needs total_steps, the planned "
                                 f"number of inner steps of each of the {members} members, got {total_steps!r}")
            device = next(iter(params.values())).device
            init = self._scheduled_rule.init_schedule_state
            state[SCHEDULE_STATE] = stack_dicts([init(int(count), device) for count in total_steps])
        return state

    def _init_states(self, params: Params) -> dict[str, dict[str, Tensor]]:
        return {name: self.rule.init_state(value) for name, value in params.items()}

    def theta_is_batched(self, theta: dict[str, Tensor]) -> bool:
        """True when ``theta`` carries a leading member axis (one copy per member)."""
        batched = {theta[key].dim() == dims + 1 for key, dims in self._theta_dims.items()}
        if len(batched) != 1:
            raise ValueError("theta tensors must all be shared or all be batched per member")
        return batched.pop()

    # ---------------------------------------------------------------------------- stepping
    def step(self, theta: dict[str, Tensor], problems: InnerProblems, batch: Batch) -> tuple[Tensor, InnerProblems]:
        """One inner step: ``(loss (M,) before the update, problems after it)``."""
        theta_batched = self.theta_is_batched(theta)
        args = (theta, problems.params, problems.opt_state, problems.step, problems.task, batch)
        if self.compile and not torch.is_grad_enabled():
            loss, params, opt_state = self._compiled_step(theta_batched, args)
        else:
            loss, params, opt_state = self._step_impl(theta_batched, *args)
        return loss, InnerProblems(params=params, opt_state=opt_state, step=problems.step + 1, task=problems.task)

    def _step_impl(self, theta_batched: bool, theta: dict[str, Tensor], params: Params,
                   opt_state: dict[str, dict[str, Tensor]], step: Tensor, task: TaskDescriptor,
                   batch: Batch) -> tuple[Tensor, Params, dict[str, dict[str, Tensor]]]:
        loss, grads = self.family.loss_and_grad(params, task, batch)
        deltas, new_state = self.rule_steps(theta_batched, theta, params, grads, opt_state, step, loss)
        new_params = {name: value - deltas[name] for name, value in params.items()}
        return loss, new_params, new_state

    def rule_steps(self, theta_batched: bool, theta: dict[str, Tensor], params: Params, grads: Params,
                   opt_state: dict[str, dict[str, Tensor]], step: Tensor,
                   loss: Tensor) -> tuple[Params, dict[str, dict[str, Tensor]]]:
        """The rule's step of every tensor of every member: ``(steps to subtract, new opt_state)``.

        ``step`` (M,) is each member's update count, ``loss`` (M,) its loss before this update.
        Scheduled rules run their whole-model phase first (see the module docstring).
        """
        if self.rule.scheduled:
            return self._scheduled_steps(theta_batched, theta, params, grads, opt_state, step, loss)
        update, extra = self.member_update(theta_batched, loss)
        rule_step = step.to(torch.float32)
        deltas, new_state = {}, {}
        for name, value in params.items():
            deltas[name], new_state[name] = update(theta, value, grads[name], opt_state[name], rule_step, *extra)
        return deltas, new_state

    def _scheduled_steps(self, theta_batched: bool, theta: dict[str, Tensor], params: Params, grads: Params,
                         opt_state: dict[str, dict[str, Tensor]], step: Tensor,
                         loss: Tensor) -> tuple[Params, dict[str, dict[str, Tensor]]]:
        rule, names = self._scheduled_rule, list(params)
        theta_dim = 0 if theta_batched else None
        rule_step = step.to(torch.float32)
        summary = vmap(rule.tensor_summary)
        summaries = torch.stack([summary(params[name], grads[name], opt_state[name]) for name in names], dim=1)
        rows = {key: torch.stack([opt_state[name][key] for name in names], dim=1) for key in rule.schedule_tensor_keys}
        controls, schedule_state, new_rows = vmap(self.schedule_member, in_dims=(theta_dim, 0, 0, 0, 0, 0))(
            theta, opt_state[SCHEDULE_STATE], rows, summaries, rule_step, loss)
        update = vmap(self.update_with_control, in_dims=(theta_dim, 0, 0, 0, 0, 0))
        deltas: Params = {}
        new_state: dict[str, dict[str, Tensor]] = {}
        for index, name in enumerate(names):
            deltas[name], updated = update(theta, params[name], grads[name], opt_state[name], rule_step,
                                           controls[:, index])
            new_state[name] = {**opt_state[name], **updated,
                               **{key: value[:, index] for key, value in new_rows.items()}}
        # last and in init_opt_state's key order: the same pytree every step (one compiled signature)
        new_state[SCHEDULE_STATE] = {key: schedule_state[key] for key in opt_state[SCHEDULE_STATE]}
        return deltas, new_state

    def schedule_member(self, theta: dict[str, Tensor], schedule_state: dict[str, Tensor], rows: dict[str, Tensor],
                        summaries: Tensor, step: Tensor, loss: Tensor) -> tuple[Tensor, dict[str, Tensor],
                                                                                dict[str, Tensor]]:
        """One member's ``rule.schedule``: every tensor of the member has had ``step`` updates."""
        tensor_steps = step.expand(summaries.shape[0])
        return self._scheduled_rule.schedule(theta, schedule_state, rows, summaries, tensor_steps, loss)

    def update_with_control(self, theta: dict[str, Tensor], param: Tensor, grad: Tensor, state: dict[str, Tensor],
                            step: Tensor, control: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """A scheduled rule's ``update`` with the tensor's row of the scheduler's controls as ``control``."""
        return self._scheduled_rule.update(theta, param, grad, state, step, control=control)

    @property
    def _scheduled_rule(self) -> Any:
        """The rule, typed for the scheduled part of the protocol (``UpdateRule.scheduled``: duck-typed)."""
        return self.rule

    def member_update(self, theta_batched: bool, loss: Tensor) -> tuple[Callable[..., Any], tuple[Tensor, ...]]:
        """``rule.update`` vmapped over members, and the extra positional arguments to pass it.

        Call it as ``update(theta, param, grad, state, step, *extra)``; rules that read the loss get
        each member's ``loss`` (vmap batches positional arguments only). Not for scheduled rules,
        whose tensors are updated together (:meth:`rule_steps`).
        """
        theta_dim = 0 if theta_batched else None
        if self.rule.scheduled:
            raise ValueError(f"rule {self.rule.name!r} is scheduled: its tensors step together through rule_steps")
        if self.rule.needs_loss:
            return vmap(self.update_with_loss, in_dims=(theta_dim, 0, 0, 0, 0, 0)), (loss,)
        return vmap(self.rule.update, in_dims=(theta_dim, 0, 0, 0, 0)), ()

    def update_with_loss(self, theta: dict[str, Tensor], param: Tensor, grad: Tensor, state: dict[str, Tensor],
                          step: Tensor, loss: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``rule.update`` with the member's inner loss (before the update) as the ``loss`` keyword."""
        return self.rule.update(theta, param, grad, state, step, loss=loss)

    def _compiled_step(self, theta_batched: bool, args: tuple) -> tuple:
        """:meth:`_step_impl` through Inductor (:class:`~lopt_hf.kernels.inductor_graphs.InductorGraphs`: traced with the
        skinny and narrow products rewritten, one graph per signature). Inputs are made contiguous (a no-op for
        all but broadcast initial states, e.g. a scheduled rule's first step), so one graph serves every step of
        a signature."""
        graphs = self._compiled.get(theta_batched)
        if graphs is None:
            graphs = self._compiled[theta_batched] = InductorGraphs(
                functools.partial(self._step_impl, theta_batched), options=CONTRACTED_SKINNY_COMPILE_OPTIONS,
                decompositions=SKINNY_DECOMPOSITIONS, what="the vectorised inner step")
        return graphs(*pytree.tree_map(lambda leaf: leaf.contiguous(), args))


def run_unroll(trainer: VectorizedInnerTrainer, theta: dict[str, Tensor], problems: InnerProblems,
               batch_at: Callable[[int], Batch], num_steps: int,
               before_step: Callable[[int, InnerProblems], InnerProblems] | None = None, *,
               step: InnerStep | None = None) -> tuple[Tensor, InnerProblems]:
    """``num_steps`` inner steps; ``(losses (num_steps, M), problems)``.

    ``batch_at(t)`` gives step ``t``'s data (leading ``M`` axis); ``before_step(t, problems)``
    may replace members before step ``t`` (resets of finished trajectories); ``step`` replaces
    ``trainer.step`` (an estimator's own inner step, e.g. LoLO's behaviour cloning).
    """
    step = step or trainer.step
    losses = []
    for t in range(num_steps):
        if before_step is not None:
            problems = before_step(t, problems)
        loss, problems = step(theta, problems, batch_at(t))
        losses.append(loss)
    return torch.stack(losses), problems
