"""``LearnedOptimizer``: a ``torch.optim.Optimizer`` that applies an update rule to a model.

The rule (see ``lopt_hf.rules``) computes a step for each parameter tensor from its gradient
and its own per-tensor state; this class owns everything around it that users expect from a
torch optimizer:

* ``lr`` multiplies the learned step (default 1.0 — the rule's own scale), so LR schedulers
  work; decoupled ``weight_decay`` shrinks parameters by ``lr * weight_decay`` per step
  (optax's ``add_decayed_weights`` followed by the learning rate, like AdamW);
* param groups, ``step(closure)`` returning the loss;
* ``state_dict()`` holds only tensors and plain Python values, so it loads with
  ``torch.load(weights_only=True)`` (how ``transformers.Trainer`` reloads ``optimizer.pt``);
* a tensor whose gradient (or computed step) is not finite is left untouched, its state is not
  advanced, and the skip is counted — NaN never reaches the parameters;
* the rule computes in float32 whatever the parameter dtype (bf16 parameters keep float32
  optimizer state; the result is rounded once when written back);
* a rule with ``layout_sensitive = True`` computes in JAX layout: each parameter is handed to it
  as a view in that layout (``nn.Linear`` weights transposed, conv weights OIHW → HWIO) and the
  step is mapped back — see :mod:`lopt_hf.layout`. ``param_layouts`` says which tensor is which
  (``load_lopt`` infers it from the model); tensors it does not list follow
  :func:`lopt_hf.layout.default_layout` (PyTorch conventions by rank);
* a param group with ``"route": "adamw"`` (and ``betas``, ``eps``) is stepped by plain AdamW
  math (optax.adamw / torch.optim.AdamW: bias-corrected moments, decoupled weight decay) instead
  of the rule — how harnesses such as Celo2's send biases and embeddings to AdamW while staying
  one optimizer for LR schedulers, ``state_dict`` and ``transformers.Trainer``
  (see :mod:`lopt_hf.harness`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .layout import AS_IS, check_layouts, default_layout, from_rule_layout, to_rule_layout
from .rules.base import Theta, UpdateRule
from .rules.features import DEFAULT_CHUNK_SIZE

STEP_KEY = "step"
SKIPPED_KEY = "skipped_nonfinite"
_RESERVED_KEYS = {STEP_KEY, SKIPPED_KEY}

ROUTE_KEY = "route"
LEARNED_ROUTE = "learned"
ADAMW_ROUTE = "adamw"
ROUTES = (LEARNED_ROUTE, ADAMW_ROUTE)
# torch.optim.AdamW's defaults, for an "adamw" group that does not set its own.
ADAMW_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-8}

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


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

    A param group may set ``"route": "adamw"`` (with ``"betas"``, ``"eps"``; torch's AdamW
    defaults otherwise) to be stepped by AdamW instead of the rule.
    """

    def __init__(self, params: ParamsT, rule: UpdateRule, theta: Theta, lr: float = 1.0,
                 weight_decay: float = 0.0, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
                 param_layouts: Mapping[Tensor, str] | None = None) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}: must be >= 0")
        missing = sorted(set(rule.theta_shapes()) - set(theta))
        if missing:
            raise ValueError(f"theta lacks tensors {missing} required by rule {rule.name!r}")
        self.rule = rule
        self.chunk_size = chunk_size
        self._theta_cpu = {name: value.detach().to(torch.float32) for name, value in theta.items()}
        self._theta_by_device: dict[torch.device, Theta] = {}
        check_layouts(param_layouts)
        self.param_layouts: dict[Tensor, str] = dict(param_layouts or {})
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "rule": rule.name,
                                  ROUTE_KEY: LEARNED_ROUTE})

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
        if not getattr(self.rule, "layout_sensitive", False):
            return AS_IS
        layout = self.param_layouts.get(param)
        return layout if layout is not None else default_layout(param)

    # ------------------------------------------------------------------------------ helpers
    def theta_on(self, device: torch.device) -> Theta:
        """The meta-parameters on ``device`` (cached)."""
        if device not in self._theta_by_device:
            self._theta_by_device[device] = {k: v.to(device) for k, v in self._theta_cpu.items()}
        return self._theta_by_device[device]

    @property
    def theta(self) -> Theta:
        """The meta-parameters (float32, CPU)."""
        return self._theta_cpu

    def _init_param_state(self, param: Tensor) -> dict[str, Any]:
        rule_state = self.rule.init_state(to_rule_layout(param.detach().to(torch.float32), self.layout_of(param)))
        clash = _RESERVED_KEYS & set(rule_state)
        if clash:
            raise RuntimeError(f"rule {self.rule.name!r} uses reserved state keys {sorted(clash)}")
        return {STEP_KEY: 0, SKIPPED_KEY: 0, **rule_state}

    @property
    def num_skipped_nonfinite(self) -> int:
        """How many tensor-steps were skipped because the gradient or step was not finite."""
        return sum(int(state.get(SKIPPED_KEY, 0)) for state in self.state.values())

    # --------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one learned update to every parameter that has a gradient; return the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            adamw = group.get(ROUTE_KEY, LEARNED_ROUTE) == ADAMW_ROUTE
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                if adamw:
                    self._adamw_step_tensor(param, lr, weight_decay, group["betas"], group["eps"])
                else:
                    self._step_tensor(param, lr, weight_decay)
        return loss

    def _step_tensor(self, param: Tensor, lr: float, weight_decay: float) -> None:
        state = self.state[param]
        if not state:
            state.update(self._init_param_state(param))
        rule_state = {key: value for key, value in state.items() if key not in _RESERVED_KEYS}
        param32 = param.detach().to(torch.float32)
        grad32 = param.grad.detach().to(torch.float32)
        if not bool(torch.isfinite(grad32).all()):
            state[SKIPPED_KEY] += 1
            return
        layout = self.layout_of(param)
        direction, new_rule_state = self.rule.update(
            self.theta_on(param.device), to_rule_layout(param32, layout), to_rule_layout(grad32, layout), rule_state,
            state[STEP_KEY], chunk_size=self.chunk_size)
        direction = from_rule_layout(direction, layout)
        if not bool(torch.isfinite(direction).all()):
            state[SKIPPED_KEY] += 1
            return
        new_param = param32 if weight_decay == 0.0 else param32 * (1.0 - lr * weight_decay)
        new_param = new_param - lr * direction
        param.copy_(new_param)  # one rounding to the parameter dtype (e.g. bf16)
        state.update(new_rule_state)
        state[STEP_KEY] += 1

    def _adamw_step_tensor(self, param: Tensor, lr: float, weight_decay: float, betas: tuple[float, float],
                           eps: float) -> None:
        """One AdamW step (optax.adamw / torch.optim.AdamW math) in float32."""
        state = self.state[param]
        if not state:
            zeros = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
            state.update({STEP_KEY: 0, SKIPPED_KEY: 0, "exp_avg": zeros, "exp_avg_sq": zeros.clone()})
        grad32 = param.grad.detach().to(torch.float32)
        if not bool(torch.isfinite(grad32).all()):
            state[SKIPPED_KEY] += 1
            return
        beta1, beta2 = betas
        count = state[STEP_KEY] + 1
        exp_avg = state["exp_avg"].lerp(grad32, 1.0 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1.0 - beta2) * grad32 * grad32
        step = (exp_avg / (1.0 - beta1 ** count)) / ((exp_avg_sq / (1.0 - beta2 ** count)).sqrt() + eps)
        param32 = param.detach().to(torch.float32)
        new_param = param32 if weight_decay == 0.0 else param32 * (1.0 - lr * weight_decay)
        param.copy_(new_param - lr * step)
        state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
        state[STEP_KEY] = count

    # ------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()``; refuses a state of a different rule."""
        for group in state_dict.get("param_groups", []):
            saved_rule = group.get("rule", self.rule.name)
            if saved_rule != self.rule.name:
                raise ValueError(f"optimizer state was saved by rule {saved_rule!r}, but this optimizer "
                                 f"runs rule {self.rule.name!r}")
        super().load_state_dict(state_dict)
        # torch casts floating state to each parameter's dtype on load (bf16 for bf16 params),
        # which would lose our float32 rule state: put back the saved tensors with their dtype.
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[param][key] = value.to(device=param.device).clone()

    def __repr__(self) -> str:
        groups = ", ".join(f"group {i}: {g.get(ROUTE_KEY, LEARNED_ROUTE)}, lr={g['lr']}, "
                           f"weight_decay={g['weight_decay']}, {len(g['params'])} tensors"
                           for i, g in enumerate(self.param_groups))
        return f"LearnedOptimizer(rule={self.rule.name!r}, {groups})"
