"""``LearnedOptimizer``: a ``torch.optim.Optimizer`` that applies an update rule to a model.

The rule (see ``lopt_hf.rules``) computes a step for each parameter tensor from its gradient
and its own per-tensor state; this class owns everything around it that users expect from a
torch optimizer:

* ``lr`` multiplies the learned step (default 1.0 — the rule's own scale), so LR schedulers
  work; decoupled ``weight_decay`` shrinks parameters by ``lr * weight_decay`` per step
  (optax's ``add_decayed_weights`` followed by the learning rate, like AdamW);
* param groups, ``step(closure)`` returning the loss;
* the training loss, for rules that need it (``rule.needs_loss``, e.g. ``opt2vec``): the loss of
  ``step(closure)``, or ``step(loss=loss)``, or ``record_loss(loss)`` before a plain ``step()``
  (for callers that cannot pass arguments to ``step``: ``transformers.Trainer`` callbacks,
  Accelerate's wrapped optimizer). Without one such a rule's step raises a clear error; a
  non-finite loss skips the learned tensors like a non-finite gradient. Other rules ignore it;
* ``state_dict()`` holds only tensors and plain Python values, so it loads with
  ``torch.load(weights_only=True)`` (how ``transformers.Trainer`` reloads ``optimizer.pt``);
* a tensor whose gradient (or computed step) is not finite is left untouched, its state is not
  advanced, and the skip is counted — NaN never reaches the parameters. On the ``"adamw"`` route a
  gradient element of magnitude ≥ ``ADAMW_GRAD_LIMIT`` (1e19; its square overflows float32) counts
  as non-finite too, so one absurd gradient cannot make a second moment infinite. One exception to
  "not advanced": the in-place kernels (``small_fc_lopt``, ``mlp_lopt``, ``per_param_mlp``, Celo, VeLO: every
  tensor, eagerly; Celo-Adam's and Celo2's: tensors of ≥ 4M elements; :mod:`lopt_hf.kernels.in_place`,
  :mod:`lopt_hf.kernels.celo`; they keep memory near AdamW's) advance the accumulators with the (finite) gradient while computing the step, so when only
  ``lr·step`` or the decayed parameter overflows afterwards (absurd ``lr`` / ``weight_decay``), the parameter and
  its step count stay untouched but its accumulators moved;
* ``step()`` checks what could stop it (sparse gradients) before it changes anything;
  ``load_state_dict`` checks every state tensor's shape against what the rule keeps for that
  parameter before it loads anything; a 0-element tensor is left as it is (no state, not counted);
* the rule computes in float32 whatever the parameter dtype (bf16 parameters keep float32
  optimizer state; the result is rounded once when written back);
* a rule with ``layout_sensitive = True`` computes in JAX layout: each parameter is handed to it
  as a view in that layout (``nn.Linear`` weights transposed, conv weights OIHW → HWIO) and the
  step is mapped back — see :mod:`lopt_hf.layout`. ``param_layouts`` says which tensor is which
  (``load_lopt`` infers it from the model); tensors it does not list follow
  :func:`lopt_hf.layout.default_layout` (PyTorch conventions by rank);
* ``set_total_steps(n)`` records the planned length of training in every param group
  (``"total_steps"``; saved with ``state_dict``) for rules and tools that need it —
  ``lopt_hf.LearnedOptimizerCallback`` sets it from ``transformers.Trainer``'s ``max_steps``;
* stepped by ``transformers.Trainer`` without that callback (found on the call stack at the first
  ``step()``), it warns once (:class:`LearnedOptimizerSettingsWarning`) that the callback is missing,
  saying what Trainer's LR schedule and gradient clipping do to the learned step;
* the rule runs through its deployment kernel (:func:`lopt_hf.kernels.kernel_for`), one learned-step
  path for every rule: tensors go to the kernel in stacks — for a rule with ``stackable = True``
  (Celo2) the tensors of one shape, layout, dtype and step count together (in stacks of at most
  ``STACK_NUMEL_LIMIT`` elements: a transformer's repeated blocks cost a few batched kernel calls
  instead of one set per tensor), for other rules stacks of one. Each tensor keeps its own state
  entries (for Celo2 views of the stacked result, so the next step stacks them back for free;
  ``state_dict`` saves the shared storage once);
* a *scheduled* rule (``rule.scheduled``: Celo, Celo-Adam, VeLO) first runs its whole-model phase
  once per step over every tensor of all learned groups that has a finite gradient (its
  ``schedule``, with the loss and the planned number of steps from :meth:`set_total_steps`; a step
  without them raises a clear error), then each tensor's update with its row of the scheduler's
  controls. The whole-model state (loss statistics, iteration) is ``state["schedule"]``, saved by
  ``state_dict``; each tensor's scheduler rows are in that tensor's state and advance only when the
  tensor's update is committed (a skipped tensor's rows stay as they were);
* every ``step()`` keeps cheap statistics of what it did (:meth:`LearnedOptimizer.last_step_stats`:
  RMS of the applied update per route, tensors updated / skipped), for logging;
* a param group with ``"route": "adamw"`` (and ``betas``, ``eps``) is stepped by torch's own
  foreach AdamW (:mod:`lopt_hf.adamw`; bit for bit ``torch.optim.AdamW(foreach=True)``, float32
  moments also for bf16 parameters) instead of the rule — how harnesses such as Celo2's send biases and embeddings to AdamW while staying
  one optimizer for LR schedulers, ``state_dict`` and ``transformers.Trainer``
  (see :mod:`lopt_hf.harness`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .adamw import adamw_step
from .kernels import RuleKernel, kernel_for
from .kernels.base import stack_tensors
from .kernels.compiled import compiled_kernel
from .layout import AS_IS, check_layouts, default_layout, from_rule_layout, to_rule_layout
from .lr_schedules import describe_clipping, describe_trainer_schedule, on_learned_schedule
from .rules.base import Theta, UpdateRule
from .rules.features import DEFAULT_CHUNK_SIZE
from .warning_location import stacklevel_outside_libraries

STEP_KEY = "step"
TOTAL_STEPS_KEY = "total_steps"
# ``optimizer.state`` entry (a string key, kept by ``state_dict``) of a scheduled rule's whole-model state.
SCHEDULE_KEY = "schedule"
SKIPPED_KEY = "skipped_nonfinite"
_RESERVED_KEYS = {STEP_KEY, SKIPPED_KEY}

ROUTE_KEY = "route"
LEARNED_ROUTE = "learned"
ADAMW_ROUTE = "adamw"
ROUTES = (LEARNED_ROUTE, ADAMW_ROUTE)
# The AdamW route treats a gradient with an element of this magnitude or more like a non-finite one (skipped,
# counted): its square (1e38 here; float32's largest is 3.4e38) would make the second moment infinite, and
# m / (√v + eps) = 0 would then never move that element again. No trained model's gradient comes near it.
ADAMW_GRAD_LIMIT = 1.0e19
# torch.optim.AdamW's defaults, for an "adamw" group that does not set its own.
ADAMW_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8}

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


class LearnedOptimizerSettingsWarning(UserWarning):
    """A ``transformers.Trainer`` setting silently changes what a learned optimizer does."""


# Most elements in one stack of same-shape tensors for rules with ``update_stacked``: stacking pays
# where tensors are small (Python and kernel overhead per tensor); larger ones go alone, so a
# stack's temporaries (e.g. Newton–Schulz's) stay bounded.
STACK_NUMEL_LIMIT = 1 << 20


class LearnedOptimizer(torch.optim.Optimizer):
    """Apply a learned update ``rule`` with meta-parameters ``theta`` to ``params``.

    Args:
        params: tensors or param-group dicts, as for any torch optimizer.
        rule: the update rule (e.g. ``lopt_hf.build_rule("small_fc_lopt")``).
        theta: the rule's meta-parameters (flat dict of tensors; not trained here).
        lr: multiplier of the learned step (1.0 = the step the rule was meta-trained with).
        weight_decay: decoupled weight decay, applied as ``p -= lr * weight_decay * p``.
        chunk_size: how many elements go through the rule's per-element network at once
            (bounds memory; does not change results beyond rounding).
        param_layouts: for layout-sensitive rules, the layout of each parameter
            (``lopt_hf.layout.infer_layouts(model)``); unlisted tensors get
            ``lopt_hf.layout.default_layout``. Ignored by other rules.
        compile: step through ``torch.compile`` (:mod:`lopt_hf.kernels.compiled`) where that pays: the
            rules with small, skinny or no per-element networks (Celo, VeLO, ``per_param_mlp``, Celo-Adam,
            Opt2Vec; Celo's and VeLO's steps 2–3× and per_param_mlp's 3–3.7× faster on CPU in benchmark runs,
            after a compilation of seconds per kind of tensor on the first step; below 4M elements per tensor
            their compiled graph builds the new state whole: up to about twice the eager peak memory), and
            ``small_fc_lopt``'s first pass (its features' per-tensor statistics, fused into one pass; its network
            stays eager). Results differ from the eager step in the last bits only. Other rules ignore it.

    A param group may set ``"route": "adamw"`` (with ``"betas"``, ``"eps"``; torch's AdamW
    defaults otherwise) to be stepped by AdamW instead of the rule.
    """

    def __init__(self, params: ParamsT, rule: UpdateRule, theta: Theta, lr: float = 1.0,
                 weight_decay: float = 0.0, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
                 param_layouts: Mapping[Tensor, str] | None = None, compile: bool = False) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}: must be >= 0")
        missing = sorted(set(rule.theta_shapes()) - set(theta))
        if missing:
            raise ValueError(f"theta lacks tensors {missing} required by rule {rule.name!r}")
        self.rule = rule
        self.chunk_size = chunk_size
        self.compile = bool(compile)
        self._theta_cpu = {name: value.detach().to(torch.float32) for name, value in theta.items()}
        self._theta_by_device: dict[torch.device, Theta] = {}
        self._kernels: dict[torch.device, tuple[RuleKernel, bool]] = {}  # with whether compiled
        check_layouts(param_layouts)
        self.param_layouts: dict[Tensor, str] = dict(param_layouts or {})
        # Settings of the artifact this optimizer was loaded from (``load_lopt`` fills it in), so
        # tools can tell e.g. a learning rate far from the one the rule was meta-trained with.
        self.artifact_defaults: dict[str, Any] = {}
        # False until someone has checked how this optimizer is driven: ``LearnedOptimizerCallback`` sets it at
        # the start of training; otherwise the first ``step()`` looks whether ``transformers.Trainer`` drives it
        # with settings that change the learned step (an LR schedule, gradient clipping) and warns once.
        self.settings_checked = False
        self._step_stats = _StepStats()
        self._recorded_loss: Tensor | None = None  # set by record_loss, consumed by the next step()
        # A scheduled rule's output of this step: param -> (control row, the tensor's new scheduler rows).
        self._controls: dict[Tensor, tuple[Tensor, dict[str, Tensor]]] = {}
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "rule": rule.name,
                                  ROUTE_KEY: LEARNED_ROUTE, TOTAL_STEPS_KEY: None})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; an ``"adamw"``-routed group gets torch's AdamW ``betas``/``eps`` if unset."""
        route = param_group.get(ROUTE_KEY, LEARNED_ROUTE)
        if route not in ROUTES:
            raise ValueError(f"unknown param-group route {route!r}; choose one of {list(ROUTES)}")
        if route == ADAMW_ROUTE:
            for key, value in ADAMW_DEFAULTS.items():
                param_group.setdefault(key, value)
            beta1, beta2 = param_group["betas"]
            if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
                raise ValueError(f"invalid AdamW betas {param_group['betas']}: each must be in [0, 1)")
            if not param_group["eps"] >= 0.0:
                raise ValueError(f"invalid AdamW eps {param_group['eps']}: must be >= 0")
            param_group["betas"] = (float(beta1), float(beta2))
        for key in ("lr", "weight_decay"):
            if key in param_group and not param_group[key] >= 0.0:
                raise ValueError(f"invalid {key} {param_group[key]} in a param group: must be >= 0")
        super().add_param_group(param_group)

    def layout_of(self, param: Tensor) -> str:
        """The layout ``param`` is handed to the rule in (``as_is`` unless the rule is layout-sensitive)."""
        if not self.rule.layout_sensitive:
            return AS_IS
        layout = self.param_layouts.get(param)
        return layout if layout is not None else default_layout(param)

    # ------------------------------------------------------------------------------ helpers
    def theta_on(self, device: torch.device) -> Theta:
        """The meta-parameters on ``device`` (cached)."""
        if device not in self._theta_by_device:
            self._theta_by_device[device] = {k: v.to(device) for k, v in self._theta_cpu.items()}
        return self._theta_by_device[device]

    def kernel_on(self, device: torch.device) -> RuleKernel:
        """The rule's deployment kernel with the meta-parameters on ``device`` (cached; rebuilt if ``rule`` or
        :attr:`compile` changes)."""
        kernel, compiled = self._kernels.get(device, (None, False))
        if kernel is None or kernel.rule is not self.rule or compiled != self.compile:
            kernel = kernel_for(self.rule, self.theta_on(device))
            if self.compile:
                kernel = compiled_kernel(kernel)
            self._kernels[device] = (kernel, self.compile)
        return kernel

    @property
    def theta(self) -> Theta:
        """The meta-parameters (float32, CPU)."""
        return self._theta_cpu

    def _init_param_state(self, param: Tensor) -> dict[str, Any]:
        rule_param = to_rule_layout(param.detach().to(torch.float32), self.layout_of(param))
        rule_state = self.kernel_on(param.device).init_state(rule_param)
        clash = _RESERVED_KEYS & set(rule_state)
        if clash:
            raise RuntimeError(f"rule {self.rule.name!r} uses reserved state keys {sorted(clash)}")
        return {STEP_KEY: 0, SKIPPED_KEY: 0, **rule_state}

    @property
    def num_skipped_nonfinite(self) -> int:
        """How many tensor-steps were skipped because the gradient or step was not finite."""
        return sum(int(state.get(SKIPPED_KEY, 0)) for state in self.state.values())

    # ----------------------------------------------------------------------- training length
    def set_total_steps(self, total_steps: int | None) -> None:
        """Record the planned number of optimizer steps of this training run (``None``: unknown).

        Stored as ``"total_steps"`` in every param group, so it is saved and restored with
        ``state_dict()``. ``LearnedOptimizerCallback`` calls this with ``transformers.Trainer``'s
        ``state.max_steps``; in a plain loop call it yourself before training.
        """
        if total_steps is not None:
            if isinstance(total_steps, bool) or int(total_steps) != total_steps or total_steps <= 0:
                raise ValueError(f"total_steps must be a positive integer or None, got {total_steps!r}")
            total_steps = int(total_steps)
        for group in self.param_groups:
            group[TOTAL_STEPS_KEY] = total_steps
        schedule_state = self.state.get(SCHEDULE_KEY)
        if schedule_state and total_steps is not None:  # a scheduled rule's fraction of training follows the plan
            schedule_state["num_steps"] = torch.full_like(schedule_state["num_steps"], float(total_steps))

    @property
    def total_steps(self) -> int | None:
        """The planned number of steps set by :meth:`set_total_steps` (``None`` if never set)."""
        values = {group.get(TOTAL_STEPS_KEY) for group in self.param_groups}
        return values.pop() if len(values) == 1 else None

    # --------------------------------------------------------------------------- statistics
    def last_step_stats(self) -> dict[str, float | int]:
        """What the last ``step()`` did, as plain numbers (empty before the first step).

        * ``update_rms`` — root mean square of the applied change ``new - old`` (float32, before
          rounding to the parameter dtype; learning rate and weight decay included) over every
          element of every tensor the learned rule updated; ``update_rms_adamw`` likewise for
          ``"adamw"``-routed groups (only if there are any);
        * ``updated_tensors`` / ``skipped_nonfinite_tensors`` — tensors updated / skipped because
          their gradient or step was not finite.

        The sums are kept as tensors during ``step()``; reading them here is the only sync.
        """
        return self._step_stats.as_dict()

    # --------------------------------------------------------------------------------- loss
    def record_loss(self, loss: Tensor | float) -> None:
        """Record the training loss of the current batch for the next ``step()`` (which consumes it).

        For rules with ``needs_loss`` when ``step()`` is called by someone else (a
        ``transformers.Trainer`` callback, Accelerate's wrapped optimizer). The tensor is detached
        and not read until the step, so recording costs no device sync.
        """
        self._recorded_loss = _scalar_loss(loss)

    def _loss_for_rule(self, given: Tensor | float | None) -> Tensor | None:
        """The loss handed to the rule this step (``None`` for rules that do not use it)."""
        recorded, self._recorded_loss = self._recorded_loss, None
        if not self.rule.needs_loss:
            return None
        if given is not None:
            return _scalar_loss(given)
        if recorded is not None:
            return recorded
        if any(param.grad is not None for group in self.param_groups
               if group.get(ROUTE_KEY, LEARNED_ROUTE) == LEARNED_ROUTE for param in group["params"]):
            raise RuntimeError(f"rule {self.rule.name!r} needs the training loss: call step(closure), "
                               f"step(loss=loss) or record_loss(loss) before step() (with transformers.Trainer: "
                               f"lopt_hf.LearnedOptimizerCallback.attach(trainer) hands it the loss)")
        return None

    # --------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, *,  # type: ignore[override]
             loss: Tensor | float | None = None) -> float | None:
        """Apply one learned update to every parameter that has a gradient; return the closure's loss.

        Args:
            closure: re-evaluates the model and returns the loss (torch convention).
            loss: the training loss of this batch, for rules with ``needs_loss`` (ignored by
                others); instead of a closure, or of an earlier :meth:`record_loss`.
        """
        if closure is not None and loss is not None:
            raise ValueError("pass either a closure or loss=..., not both")
        if not self.settings_checked:
            self.settings_checked = True
            _warn_if_trainer_changes_the_step(self)
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        self._check_gradients()  # before anything changes: a bad gradient leaves every group as it was
        rule_loss = self._loss_for_rule(closure_loss if closure is not None else loss)
        skip_learned = rule_loss is not None and not bool(torch.isfinite(rule_loss))
        self._step_stats = _StepStats()
        self._controls = {}
        if self.rule.scheduled and rule_loss is not None and not skip_learned:
            self._run_schedule(rule_loss)
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            params = [param for param in group["params"] if _steps(param)]
            if group.get(ROUTE_KEY, LEARNED_ROUTE) == ADAMW_ROUTE:
                self._adamw_step_group(params, lr, weight_decay, group["betas"], group["eps"])
            else:
                self._step_learned_group(params, lr, weight_decay, rule_loss, skip_learned)
        return closure_loss

    def _check_gradients(self) -> None:
        """Raise for gradients no route can step (sparse ones), naming the tensor, before any group is stepped."""
        for group_index, group in enumerate(self.param_groups):
            for param_index, param in enumerate(group["params"]):
                if param.grad is not None and param.grad.is_sparse:
                    raise RuntimeError(f"LearnedOptimizer does not support sparse gradients (param group "
                                       f"{group_index}, tensor {param_index} of shape {tuple(param.shape)}); "
                                       "nothing was stepped")

    def _learned_params(self) -> list[Tensor]:
        """Every parameter of the learned-route groups, in group order."""
        return [param for group in self.param_groups if group.get(ROUTE_KEY, LEARNED_ROUTE) == LEARNED_ROUTE
                for param in group["params"]]

    def _run_schedule(self, loss: Tensor) -> None:
        """A scheduled rule's whole-model phase over the learned tensors with finite gradients; fills
        :attr:`_controls`. The whole-model state advances here, each tensor's rows when it is committed."""
        params = [param for param in self._learned_params() if _steps(param)]
        if not params:
            return
        total_steps = self.total_steps
        if total_steps is None:
            raise RuntimeError(
                f"rule {self.rule.name!r} schedules its steps by the planned length of training: call "
                "optimizer.set_total_steps(num_steps) before the first step (with transformers.Trainer, add "
                "lopt_hf.LearnedOptimizerCallback, which sets it from max_steps)")
        for param in params:
            if not self.state[param]:
                self.state[param].update(self._init_param_state(param))
        grads = [param.grad.detach().to(torch.float32) for param in params]
        finite = torch.isfinite(torch.stack(torch._foreach_norm(grads))).tolist()  # one reduction, see _finite_rows
        kept = [(param, grad) for param, grad, ok in zip(params, grads, finite)
                if ok or bool(torch.isfinite(grad).all())]
        if not kept:
            return
        params, grads = [param for param, _ in kept], [grad for _, grad in kept]
        device = params[0].device
        schedule_state = self.state.get(SCHEDULE_KEY) or self.rule.init_schedule_state(total_steps, device)
        rows = {key: torch.stack([self.state[param][key].to(device) for param in params])
                for key in self.rule.schedule_tensor_keys}
        if self.rule.summary_size():  # per-tensor statistics (VeLO), from the state before this step
            summaries = torch.stack([self._tensor_summary(param, grad).to(device)
                                     for param, grad in zip(params, grads)])
        else:  # Celo's scheduler reads no per-tensor statistics: nothing to compute
            summaries = torch.zeros(len(params), 0, device=device)
        steps = torch.tensor([self.state[param][STEP_KEY] for param in params], device=device)
        controls, self.state[SCHEDULE_KEY], new_rows = self.rule.schedule(
            self.theta_on(device), schedule_state, rows, summaries, steps, loss.to(device))
        for index, param in enumerate(params):
            self._controls[param] = (controls[index].to(param.device),
                                     {key: value[index].to(param.device) for key, value in new_rows.items()})

    def _tensor_summary(self, param: Tensor, grad32: Tensor) -> Tensor:
        """A scheduled rule's per-tensor scheduler inputs, computed in the rule's layout."""
        layout = self.layout_of(param)
        rule_state = {key: value for key, value in self.state[param].items() if key not in _RESERVED_KEYS}
        return self.kernel_on(param.device).tensor_summary(to_rule_layout(param.detach().to(torch.float32), layout),
                                                           to_rule_layout(grad32, layout), rule_state)

    def _step_learned_group(self, params: list[Tensor], lr: float, weight_decay: float, loss: Tensor | None,
                            skip: bool) -> None:
        """The learned step of a group, through the rule's kernel. For a kernel that ``stacks``, tensors
        of one shape, layout, dtype, device and step count go together, in stacks of at most
        :data:`STACK_NUMEL_LIMIT` elements (small tensors are where per-tensor overhead counts);
        otherwise every tensor is a stack of one.
        """
        stacks: dict[tuple, list[list[Tensor]]] = {}
        for param in params:
            state = self.state[param]
            if not state:
                state.update(self._init_param_state(param))
            if skip:
                self._count_skipped(state)
                continue
            key = (tuple(param.shape), param.dtype, param.device, self.layout_of(param), state[STEP_KEY])
            if not self.kernel_on(param.device).stacks:
                key = (*key, id(param))  # a stack of one
            bucket = stacks.setdefault(key, [[]])
            if bucket[-1] and (len(bucket[-1]) + 1) * param.numel() > STACK_NUMEL_LIMIT:
                bucket.append([])
            bucket[-1].append(param)
        for key, bucket in stacks.items():
            for stack in bucket:
                self._step_stack(stack, key[3], lr, weight_decay, loss)

    def _step_stack(self, params: list[Tensor], layout: str, lr: float, weight_decay: float,
                    loss: Tensor | None) -> None:
        """One kernel call for same-key tensors (see :meth:`_step_learned_group`)."""
        if not _representable(lr, weight_decay) or (self.rule.scheduled
                                                     and not all(param in self._controls for param in params)):
            # lr, weight_decay or the decay factor beyond float32: no new value would be finite;
            # or a scheduled rule without controls for a tensor (its gradient is not finite)
            kept = [param for param in params if param in self._controls] if self.rule.scheduled else []
            for param in params:
                if param not in kept:
                    self._count_skipped(self.state[param])
            if kept and _representable(lr, weight_decay):
                self._step_stack(kept, layout, lr, weight_decay, loss)
            return
        grads = stack_tensors([param.grad.detach() for param in params]).to(torch.float32)
        # a scheduled rule's tensors all have controls here: _run_schedule checked their gradients already
        finite = [True] * len(params) if self.rule.scheduled else _finite_rows(grads)
        if not all(finite):  # leave those tensors (and their state) untouched, count them
            for param, ok in zip(params, finite):
                if not ok:
                    self._count_skipped(self.state[param])
            kept = [param for param, ok in zip(params, finite) if ok]
            if kept:
                self._step_stack(kept, layout, lr, weight_decay, loss)
            return
        states = [self.state[param] for param in params]
        rule_states = [{key: value for key, value in state.items() if key not in _RESERVED_KEYS} for state in states]
        param32 = stack_tensors([param.detach() for param in params]).to(torch.float32)
        device = params[0].device
        if self.rule.scheduled:
            loss_kwargs = {"control": torch.stack([self._controls[param][0] for param in params])}
        else:
            loss_kwargs = {} if loss is None else {"loss": loss.to(device)}
        direction, new_states = self.kernel_on(device).update_stack(
            to_rule_layout(param32, layout, stacked=True), to_rule_layout(grads, layout, stacked=True), rule_states,
            states[0][STEP_KEY], chunk_size=self.chunk_size, **loss_kwargs)
        direction = from_rule_layout(direction, layout, stacked=True)
        if param32.is_contiguous() and not direction.is_contiguous():
            # a step computed in another memory order (a compiled Celo2 graph's: the rule layout, row-major) is
            # copied into the parameter's order once, a blocked transpose: reductions and the subtraction over a
            # transposed operand are strided loops (one 1024 × 1024 tensor: the subtraction alone 1.71 ms, against
            # 0.69 ms for the copy and 0.05 ms for a subtraction in one order)
            direction = direction.contiguous()
        norms = _row_norms(direction)
        # new − old = −lr·(direction + weight_decay·param)
        change_norms = norms if weight_decay == 0.0 else _row_norms(torch.add(direction, param32, alpha=weight_decay))
        # Rows whose new value param·(1 − lr·weight_decay) − lr·direction provably stays finite (so the
        # in-place update below cannot write inf / NaN); the others are computed apart and checked exactly.
        safe = _safe_rows(param32, norms, lr, weight_decay)
        finite = safe if all(safe) else _finite_rows(direction, norms)
        # param·(1 − lr·weight_decay) − lr·direction, in place: in a float32 stack of copies, or — one
        # float32 tensor whose new value is safe — in the parameter itself
        direct = len(params) == 1 and safe[0] and param32.data_ptr() == params[0].data_ptr()
        if direct or all(safe):
            if weight_decay != 0.0:
                param32.mul_(1.0 - lr * weight_decay)
            self.kernel_on(device).apply_step(param32, direction, lr)
        committed = []
        for index, (param, state, new_state, ok) in enumerate(zip(params, states, new_states, finite)):
            if ok and not direct:
                if all(safe):
                    param.copy_(param32[index])  # one rounding to the parameter dtype (e.g. bf16)
                else:
                    new_param = param32[index] if weight_decay == 0.0 else param32[index] * (1.0 - lr * weight_decay)
                    new_param = new_param - lr * direction[index]
                    ok = bool(torch.isfinite(new_param).all())  # lr·step (or the decayed param) may overflow
                    if ok:
                        param.copy_(new_param)
            committed.append(ok)
            if not ok:
                self._count_skipped(state)
                continue
            state.update(new_state)
            if param in self._controls:  # a scheduled rule's rows advance with the committed update
                state.update(self._controls[param][1])
            state[STEP_KEY] += 1
        self._step_stats.add_stack(LEARNED_ROUTE, lr * change_norms, param32[0].numel(), committed)

    def _count_skipped(self, state: dict[str, Any]) -> None:
        state[SKIPPED_KEY] += 1
        self._step_stats.skipped += 1

    def _adamw_step_group(self, params: list[Tensor], lr: float, weight_decay: float, betas: tuple[float, float],
                          eps: float) -> None:
        """One AdamW step (:func:`lopt_hf.adamw.adamw_step`: torch's foreach AdamW, float32) for a group's
        tensors; a tensor whose gradient is not finite — or has an element of magnitude
        :data:`ADAMW_GRAD_LIMIT` or more, whose square would overflow the float32 second moment
        and freeze that element for good — is skipped (moments untouched) and counted, and so is one
        whose new value is not finite (it keeps its value; its moments, already updated, keep this gradient)."""
        for param in params:
            state = self.state[param]
            if not state:
                zeros = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
                state.update({STEP_KEY: 0, SKIPPED_KEY: 0, "exp_avg": zeros, "exp_avg_sq": zeros.clone()})
        if not params:
            return
        grads = [param.grad.detach().to(torch.float32) for param in params]
        # Usable: every |g| < ADAMW_GRAD_LIMIT (so g² and the second moment stay finite). A 2-norm below the
        # limit proves it (one reduction, one sync); NaN, inf and larger norms are told apart exactly.
        grad_norms = torch.stack(torch._foreach_norm(grads))
        finite = (grad_norms < ADAMW_GRAD_LIMIT).tolist()
        if not all(finite):
            finite = [ok or bool(grad.abs().max() < ADAMW_GRAD_LIMIT) for ok, grad in zip(finite, grads)]
        # Steppable: a usable gradient, and lr, weight_decay, the decay factor and the step size
        # lr / (1 − β₁ᵗ) all float32 numbers (beyond, no new value would be finite, and torch's kernels
        # cannot take the step size).
        representable = _representable(lr, weight_decay)
        usable = []
        for index, ok in enumerate(finite):
            state = self.state[params[index]]
            bias_correction = 1.0 - betas[0] ** (state[STEP_KEY] + 1)
            if ok and representable and bias_correction > 0.0 and lr / bias_correction <= _FLOAT32_MAX:
                usable.append(index)
            else:
                self._count_skipped(state)
        if not usable:
            return
        group_params = [params[i] for i in usable]
        states = [self.state[param] for param in group_params]
        group_grads = [grads[i] for i in usable]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        counts = [state[STEP_KEY] + 1 for state in states]
        in_place = all(param.dtype == torch.float32 for param in group_params)
        params32 = [param.detach() if in_place else param.detach().to(torch.float32) for param in group_params]
        # the values before: for the logged change, and kept by a tensor whose new value overflows
        before = [param.clone() for param in params32]
        adamw_step(params32, group_grads, exp_avgs, exp_avg_sqs, counts, lr=lr, betas=betas, eps=eps,
                   weight_decay=weight_decay)
        # A finite 2-norm proves every new element finite (one reduction, one sync); the rest checked exactly.
        finite = torch.isfinite(torch.stack(torch._foreach_norm(params32))).tolist()
        if not all(finite):
            finite = [ok or bool(torch.isfinite(new).all()) for ok, new in zip(finite, params32)]
        committed = [index for index, ok in enumerate(finite) if ok]
        for index, ok in enumerate(finite):
            if not ok:  # its value stays; its moments, already updated, keep this gradient
                if in_place:
                    params32[index].copy_(before[index])
                self._count_skipped(states[index])
        if not committed:
            return
        changes = [before[index] for index in committed]
        torch._foreach_sub_(changes, [params32[index] for index in committed])
        self._step_stats.add_changes(ADAMW_ROUTE, changes)
        for index in committed:
            if not in_place:
                group_params[index].copy_(params32[index])  # one rounding to the parameter dtype
            states[index][STEP_KEY] = counts[index]

    # ------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()``.

        Refuses — with a ``ValueError`` naming the parameter and the key, before anything is loaded — a
        state of a different rule, or of other parameter groups, or one whose tensors do not have the
        shapes this rule keeps for these parameters (a state saved for wider layers, or by the rule with
        other hyper-parameters, would otherwise load and fail at the next ``step()``).
        """
        for group in state_dict.get("param_groups", []):
            saved_rule = group.get("rule", self.rule.name)
            if saved_rule != self.rule.name:
                raise ValueError(f"optimizer state was saved by rule {saved_rule!r}, but this optimizer "
                                 f"runs rule {self.rule.name!r}")
        self._check_state_shapes(state_dict)
        super().load_state_dict(state_dict)
        # torch casts floating state to each parameter's dtype on load (bf16 for bf16 params),
        # which would lose our float32 rule state: put back the saved tensors with their dtype.
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[param][key] = value.to(device=param.device).clone()

    def _check_state_shapes(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless every saved per-tensor state has the keys and shapes this optimizer would
        give that tensor (``init_state`` in the rule's layout, or AdamW's moments, by the saved group's route)
        and the whole-model schedule state those of ``init_schedule_state``."""
        saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, Mapping):
            raise ValueError("not an optimizer state_dict: it needs a 'param_groups' list and a 'state' mapping")
        if len(saved_groups) != len(self.param_groups) or any(
                len(saved["params"]) != len(group["params"]) for saved, group in zip(saved_groups, self.param_groups)):
            raise ValueError(f"optimizer state has param groups of sizes {[len(g['params']) for g in saved_groups]}, "
                             f"this optimizer {[len(g['params']) for g in self.param_groups]}: it was saved for "
                             "other parameters")
        expected_by_key: dict[tuple, dict[str, tuple[int, ...]]] = {}  # same shape and layout: same state
        index = 0
        for saved_group, group in zip(saved_groups, self.param_groups):
            route = saved_group.get(ROUTE_KEY, LEARNED_ROUTE)  # the route the group has once loaded
            for saved_id, param in zip(saved_group["params"], group["params"]):
                state = saved_state.get(saved_id, {})
                if state and param.numel() > 0:  # (a 0-element tensor's state is never read)
                    key = (route, tuple(param.shape), self.layout_of(param))
                    if key not in expected_by_key:
                        expected_by_key[key] = self._expected_state_shapes(param, route)
                    _check_state(f"parameter {index} (shape {tuple(param.shape)})", state, expected_by_key[key],
                                 {STEP_KEY, SKIPPED_KEY})
                index += 1
        schedule_state = saved_state.get(SCHEDULE_KEY)
        if self.rule.scheduled and schedule_state:
            expected = {key: tuple(value.shape) for key, value in self.rule.init_schedule_state(1).items()}
            _check_state(f"'{SCHEDULE_KEY}' (the whole-model state)", schedule_state, expected, set())

    def _expected_state_shapes(self, param: Tensor, route: str) -> dict[str, tuple[int, ...]]:
        """Key → shape of the state tensors ``step()`` keeps for ``param`` on ``route``."""
        if route == ADAMW_ROUTE:
            return {"exp_avg": tuple(param.shape), "exp_avg_sq": tuple(param.shape)}
        state = self._init_param_state(param)
        return {key: tuple(value.shape) for key, value in state.items() if key not in _RESERVED_KEYS}

    def __repr__(self) -> str:
        groups = ", ".join(f"group {i}: {g.get(ROUTE_KEY, LEARNED_ROUTE)}, lr={g['lr']}, "
                           f"weight_decay={g['weight_decay']}, {len(g['params'])} tensors"
                           for i, g in enumerate(self.param_groups))
        return f"LearnedOptimizer(rule={self.rule.name!r}, {groups})"


# How many calling frames the first step() looks through for a transformers.Trainer (its training loop calls
# step() through Accelerate's wrapper, the LR scheduler's and torch's hooks: about eight frames).
_TRAINER_SEARCH_DEPTH = 24


def _calling_trainer() -> Any:
    """The ``transformers.Trainer`` whose training loop is calling ``step()`` (found on the call stack by
    class, without importing transformers), or ``None``."""
    frame = sys._getframe(1)
    for _ in range(_TRAINER_SEARCH_DEPTH):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if candidate is not None and any(cls.__name__ == "Trainer" and cls.__module__.startswith("transformers.")
                                         for cls in type(candidate).__mro__):
            return candidate
        frame = frame.f_back
    return None


def _warn_if_trainer_changes_the_step(optimizer: LearnedOptimizer) -> None:
    """Warn once (:class:`LearnedOptimizerSettingsWarning`, main process only) if ``transformers.Trainer`` steps
    ``optimizer`` without ``LearnedOptimizerCallback``, which sets the planned number of steps (rules with a
    learned schedule need it), logs the optimizer's statistics and checks the settings at the start of training;
    the warning says what Trainer's LR schedule and gradient clipping do to the learned step, and points at the
    user's ``trainer.train()`` line."""
    trainer = _calling_trainer()
    args = getattr(trainer, "args", None)
    if args is None:
        return
    is_main = getattr(trainer, "is_local_process_zero", None)
    if callable(is_main) and not is_main():
        return
    max_steps = int(getattr(getattr(trainer, "state", None), "max_steps", 0) or 0)
    effects = []
    schedule = describe_trainer_schedule(args, getattr(trainer, "lr_scheduler", None), max_steps)
    if schedule:
        effects.append(on_learned_schedule(schedule, optimizer.rule.name) if optimizer.rule.scheduled else schedule)
    clipping = describe_clipping(args)
    if clipping:
        effects.append(clipping)
    warnings.warn("LearnedOptimizer is stepped by transformers.Trainer without lopt_hf.LearnedOptimizerCallback: add "
                  "it (callbacks=[lopt_hf.LearnedOptimizerCallback()], or LearnedOptimizerCallback.attach(trainer)) — "
                  "it sets the planned number of steps (rules with a learned schedule need it), logs the optimizer's "
                  "statistics and checks the Trainer settings at the start of training"
                  + ("; what Trainer does to the learned step:\n" + "\n".join(f"  - {e}" for e in effects)
                     if effects else ""),
                  LearnedOptimizerSettingsWarning, stacklevel=stacklevel_outside_libraries())


def _check_state(what: str, state: Mapping[str, Any], expected: dict[str, tuple[int, ...]], counters: set[str]) -> None:
    """Raise ``ValueError`` unless ``state`` has exactly the tensor keys of ``expected``, with those shapes,
    and the ``counters`` (plain integers)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"optimizer state of {what} is a {type(state).__name__}, not a mapping")
    missing = sorted(set(expected) - set(state)) + sorted(counters - set(state))
    extra = sorted(set(state) - set(expected) - counters)
    if missing or extra:
        problems = ([f"missing {missing}"] if missing else []) + ([f"unknown {extra}"] if extra else [])
        raise ValueError(f"optimizer state of {what} does not fit this optimizer ({'; '.join(problems)} keys): it was "
                         "saved by the rule with other hyper-parameters or for other parameters; nothing was loaded")
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            found = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else f"a {type(value).__name__}"
            raise ValueError(f"optimizer state of {what}: '{key}' has {found}, but this optimizer keeps shape "
                             f"{shape} for it — saved for differently sized parameters or by the rule with other "
                             "hyper-parameters; nothing was loaded")
    for key in counters:
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"optimizer state of {what}: '{key}' must be a count (an integer >= 0), got "
                             f"{state[key]!r}; nothing was loaded")


def _steps(param: Tensor) -> bool:
    """Does ``step()`` touch ``param``? Only with a gradient, and only if it has elements: a 0-element
    tensor has nothing to update (it is left as it is, gets no state, and counts as neither updated nor
    skipped) — and kept out of the rule, whose statistics over a tensor's elements are not defined for none."""
    return param.grad is not None and param.numel() > 0


def _scalar_loss(loss: Tensor | float) -> Tensor:
    """A loss as a detached float32 scalar tensor (on its own device)."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"the loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        return loss.detach().to(torch.float32).reshape(())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return torch.tensor(float(loss), dtype=torch.float32)
    raise TypeError(f"the loss must be a scalar tensor or a number, got {type(loss).__name__}")


def _row_norms(stacked: Tensor) -> Tensor:
    """The 2-norm of each tensor of a stack (leading axis).

    A CPU stack of one (every large tensor) takes BLAS's dot product, 2.6× faster than ``vector_norm``'s
    reduction (1M float32 elements, 2 threads: 43 vs 113 µs; the step checks a gradient and a direction this
    way). It sums float32 squares, which overflow from a norm of ≈ 1.8e19 on where ``vector_norm``'s double
    accumulator does not: a non-finite result is computed again by ``vector_norm``, so NaN, inf and huge norms
    come out as before."""
    dims = tuple(range(1, stacked.dim()))
    if not dims:
        return stacked.abs()
    if stacked.shape[0] == 1 and stacked.device.type == "cpu" and stacked.is_contiguous():
        flat = stacked.reshape(-1)
        norm = torch.dot(flat, flat).sqrt().reshape(1)
        if bool(torch.isfinite(norm)):
            return norm
    return torch.linalg.vector_norm(stacked, dim=dims)


def _row_max_abs(stacked: Tensor) -> Tensor:
    """The largest magnitude in each tensor of a stack (leading axis), NaN where a tensor holds one.

    Not ``vector_norm(ord=inf)``, whose CPU kernel is 12–23× slower than a max reduction (1M float32 elements,
    2 threads: 1.37 ms vs 60 µs for ``aminmax``, 79 µs for ``abs().amax``); a stack of one (every large tensor)
    takes ``aminmax`` over all of it, which needs no temporary."""
    if stacked.dim() == 1:
        return stacked.abs()
    if stacked.shape[0] == 1:
        low, high = torch.aminmax(stacked)
        return torch.maximum(low.abs(), high.abs()).reshape(1)
    return stacked.reshape(stacked.shape[0], -1).abs().amax(dim=1)


_FLOAT32_MAX = torch.finfo(torch.float32).max
# Largest float32 bound on |new value| accepted without an exact check (a margin below float32's max
# covers the rounding of the multiply and the subtraction).
_SAFE_FLOAT32 = 3.0e38


def _representable(lr: float, weight_decay: float) -> bool:
    """Are ``lr``, ``weight_decay`` and the decay factor ``1 − lr·weight_decay`` float32 numbers?"""
    return lr <= _FLOAT32_MAX and weight_decay <= _FLOAT32_MAX and abs(1.0 - lr * weight_decay) <= _FLOAT32_MAX


def _safe_rows(param32: Tensor, norms: Tensor, lr: float, weight_decay: float) -> list[bool]:
    """For each tensor of a stack: is ``param·(1 − lr·weight_decay) − lr·direction`` sure to be finite? One sync.

    ``|new| <= |1 − lr·weight_decay|·max|param| + lr·‖direction‖₂``: when that bound (computed in
    float32, where an overflow gives inf, and a huge ``lr`` times a zero norm gives NaN) is finite and
    below :data:`_SAFE_FLOAT32`, every element of the new value is finite. False means "check exactly".
    """
    bound = lr * norms
    decay = abs(1.0 - lr * weight_decay)
    if decay != 0.0 and param32.numel() > 0:  # (an empty tensor's new value is empty: finite)
        bound = bound + decay * _row_max_abs(param32)
    return (bound < _SAFE_FLOAT32).tolist()


def _finite_rows(stacked: Tensor, norms: Tensor | None = None) -> list[bool]:
    """For each tensor of a stack (leading axis): are all its elements finite? One sync.

    A finite 2-norm (``norms``, computed if not given: one fast reduction) proves it; a non-finite
    one means a NaN/inf element or an overflowing sum of squares, told apart exactly.
    """
    finite = torch.isfinite(_row_norms(stacked) if norms is None else norms).tolist()
    if all(finite):
        return finite
    return [ok or bool(torch.isfinite(row).all()) for ok, row in zip(finite, stacked)]


class _StepStats:
    """Running sums of one ``step()``: squared update norms per route, element and tensor counts."""

    def __init__(self) -> None:
        self.squared_sums: dict[str, Tensor] = {}
        self.numels: dict[str, int] = {}
        self.updated = 0
        self.skipped = 0

    def add_stack(self, route: str, change_norms: Tensor, numel: int, committed: list[bool]) -> None:
        """Count a stack of tensors of ``numel`` elements each (``change_norms``: the 2-norm of each
        one's ``new - old``), of which those ``committed`` count."""
        if not any(committed):
            return
        squared = change_norms ** 2
        if not all(committed):
            squared = squared[torch.tensor(committed, device=squared.device)]
        self._accumulate(route, squared.sum(), sum(committed) * numel, sum(committed))

    def add_changes(self, route: str, changes: list[Tensor]) -> None:
        """Count tensors by what the step changed (``old − new`` of each, float32)."""
        squared = torch.stack(torch._foreach_norm(changes)) ** 2
        self._accumulate(route, squared.sum(), sum(change.numel() for change in changes), len(changes))

    def _accumulate(self, route: str, squared: Tensor, numel: int, tensors: int) -> None:
        previous = self.squared_sums.get(route)
        self.squared_sums[route] = squared if previous is None else previous + squared.to(previous.device)
        self.numels[route] = self.numels.get(route, 0) + numel
        self.updated += tensors

    def as_dict(self) -> dict[str, float | int]:
        if not self.updated and not self.skipped:
            return {}
        stats: dict[str, float | int] = {}
        for route, key in ((LEARNED_ROUTE, "update_rms"), (ADAMW_ROUTE, "update_rms_adamw")):
            if route in self.squared_sums:
                stats[key] = float((self.squared_sums[route] / max(self.numels[route], 1)).sqrt())
        stats["updated_tensors"] = self.updated
        stats["skipped_nonfinite_tensors"] = self.skipped
        return stats
