"""``Lookahead``: k steps forward, 1 step back, around any ``torch.optim.Optimizer``.

Zhang, Lucas, Hinton & Ba (2019), "Lookahead Optimizer: k steps forward, 1 step back"
(arXiv:1907.08610); the interface follows ``braintools.optim.Lookahead``. The base optimizer —
SGD, AdamW, a :class:`lopt_hf.LearnedOptimizer`, anything — steps the model's parameters (the
*fast weights*) every step; every ``sync_period`` steps the *slow weights* move toward them and
the fast weights restart from there::

    slow <- slow + alpha * (fast - slow)
    fast <- slow

One ``step()`` does, in this order (braintools' chain: clip by global norm, clip by value, the
base optimizer and lookahead, weight decay, learning rate):

1. ``grad_clip_norm``: the gradients of all parameters are rescaled together so that their global
   L2 norm is at most ``grad_clip_norm`` (``optax.clip_by_global_norm``);
2. ``grad_clip_value``: each gradient element is clamped to ``[-grad_clip_value, grad_clip_value]``
   (``optax.clip``). Both rewrite ``param.grad`` in place, as ``torch.nn.utils.clip_grad_*_`` do,
   so the base optimizer sees the clipped gradients;
3. ``weight_decay``: decoupled weight decay of the fast weights, ``p <- p - lr * weight_decay * p``
   with the param group's current ``lr`` (so schedulers scale it, as in AdamW). It is applied
   just before the base step, which is the same as adding ``-lr * weight_decay * p`` to the base
   optimizer's update whenever that update does not read the parameter values (SGD, Adam, ...)
   — without keeping a copy of the parameters. It comes on top of any weight decay of the base
   optimizer itself; it only touches parameters that have a gradient;
4. the base optimizer's ``step()`` (keyword arguments of ``Lookahead.step`` are passed on, e.g.
   ``loss=`` for learned rules that need the loss);
5. every ``sync_period``-th step, the slow/fast synchronisation above. The base optimizer's own
   state (momenta, second moments) is kept across synchronisations, as in the paper.

The slow weights are copied from the parameters at the first ``step()`` (not at construction,
so a model moved to another device after the optimizer was built is handled), in the parameters'
dtype. ``param_groups`` *are* the base optimizer's (read from it on every access), so changing
``lr`` — by hand or with any ``torch.optim.lr_scheduler`` — reaches the base optimizer.
``state_dict()`` is the base optimizer's state dict plus a ``"lookahead"`` entry (slow weights,
step counter, settings): tensors and plain values only, so it loads with
``torch.load(weights_only=True)`` (``transformers.Trainer``'s ``optimizer.pt``), and
save → load → continue is bit-identical.

With a closure, ``step(closure)`` evaluates it once (with gradients enabled) before clipping and
passes its loss on to a ``LearnedOptimizer`` base; base optimizers that must re-evaluate the
closure themselves (``LBFGS``) are not supported.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from .optim import LearnedOptimizer

SLOW_KEY = "slow_param"
STATE_DICT_KEY = "lookahead"
_SETTINGS = ("sync_period", "alpha", "weight_decay", "grad_clip_norm", "grad_clip_value")


class Lookahead(torch.optim.Optimizer):
    """Wrap ``base_optimizer`` with Lookahead's slow weights, plus optional clipping and weight decay.

    Args:
        base_optimizer: any ``torch.optim.Optimizer`` (learned optimizers included); it steps
            the fast weights.
        sync_period: ``k`` — base steps between synchronisations (>= 1).
        alpha: slow-weight step size in ``[0, 1]`` (0: the slow weights never move, so the
            parameters return to their initial values at every synchronisation; 1: plain base
            optimizer).
        weight_decay: decoupled weight decay coefficient (>= 0), scaled by each group's ``lr``.
        grad_clip_norm: if set (> 0), clip the global gradient norm to this value.
        grad_clip_value: if set (> 0), clip every gradient element to ``[-v, v]``.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, sync_period: int = 5, alpha: float = 0.5,
                 weight_decay: float = 0.0, grad_clip_norm: float | None = None,
                 grad_clip_value: float | None = None) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"Lookahead wraps a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        _check_settings(sync_period, alpha, weight_decay, grad_clip_norm, grad_clip_value)
        # torch.optim.Optimizer.__init__ sets up hooks, state and the step-profiling patch; it is
        # given the parameters only to satisfy its checks: the placeholder groups it builds are
        # dropped, and ``param_groups`` reads the base optimizer's from then on.
        params = [param for group in base_optimizer.param_groups for param in group["params"]]
        super().__init__(params, {})
        self.__dict__.pop("_placeholder_param_groups", None)
        self.base_optimizer = base_optimizer
        self.defaults = base_optimizer.defaults
        self.sync_period = int(sync_period)
        self.alpha = float(alpha)
        self.weight_decay = float(weight_decay)
        self.grad_clip_norm = None if grad_clip_norm is None else float(grad_clip_norm)
        self.grad_clip_value = None if grad_clip_value is None else float(grad_clip_value)
        self.lookahead_steps = 0  # step() calls so far; a synchronisation follows every sync_period-th

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's param groups, looked up on every access.

        (Not a copy of the list: ``torch.optim.Optimizer.load_state_dict`` — which Accelerate calls
        on the base when preparing it — replaces the base's list with a new one.)
        """
        base = self.__dict__.get("base_optimizer")
        return self.__dict__["_placeholder_param_groups"] if base is None else base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:
            self.__dict__["_placeholder_param_groups"] = value
        else:
            base.param_groups = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (whose ``param_groups`` list this optimizer shares)."""
        base = self.__dict__.get("base_optimizer")
        if base is None:  # torch.optim.Optimizer.__init__ building its placeholder groups
            super().add_param_group(param_group)
        else:
            base.add_param_group(param_group)

    # --------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, **base_kwargs: Any) -> Any:  # type: ignore[override]
        """Clip, decay, step the base optimizer, and synchronise every ``sync_period`` steps.

        Returns the closure's loss if a closure is given, else what the base optimizer's ``step``
        returns.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if isinstance(self.base_optimizer, LearnedOptimizer) and "loss" not in base_kwargs:
                base_kwargs["loss"] = loss
        params = [param for group in self.param_groups for param in group["params"]]
        for param in params:
            state = self.state[param]
            if SLOW_KEY not in state:
                state[SLOW_KEY] = param.detach().clone(memory_format=torch.preserve_format)
        self._clip_gradients()
        if self.weight_decay != 0.0:
            for group in self.param_groups:
                decayed = [param for param in group["params"] if param.grad is not None]
                if decayed and group["lr"] != 0.0:
                    torch._foreach_mul_(decayed, 1.0 - group["lr"] * self.weight_decay)
        result = self.base_optimizer.step(**base_kwargs)
        self.lookahead_steps += 1
        if self.lookahead_steps % self.sync_period == 0:
            slow = [self.state[param][SLOW_KEY] for param in params]
            torch._foreach_lerp_(slow, [param.detach() for param in params], self.alpha)
            torch._foreach_copy_([param.detach() for param in params], slow)
        return loss if closure is not None else result

    def _clip_gradients(self) -> None:
        grads = [param.grad for group in self.param_groups for param in group["params"] if param.grad is not None]
        if not grads:
            return
        if self.grad_clip_norm is not None:
            # optax.clip_by_global_norm: g * min(1, max_norm / ||g||), computed on-device (no sync).
            norms = torch._foreach_norm(grads)
            device = norms[0].device
            dtype = torch.float64 if any(norm.dtype == torch.float64 for norm in norms) else torch.float32
            total = torch.linalg.vector_norm(torch.stack([norm.to(device=device, dtype=dtype) for norm in norms]))
            factor = torch.clamp(self.grad_clip_norm / total, max=1.0)
            for grad in grads:
                grad.mul_(factor.to(device=grad.device, dtype=grad.dtype))
        if self.grad_clip_value is not None:
            for grad in grads:
                grad.clamp_(-self.grad_clip_value, self.grad_clip_value)

    # ------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict plus ``"lookahead"``: slow weights, step count, settings.

        Slow weights are keyed by the parameter's index in ``param_groups`` order (the indices the
        base optimizer's ``"state"`` uses).
        """
        params = [param for group in self.param_groups for param in group["params"]]
        slow = {index: self.state[param][SLOW_KEY] for index, param in enumerate(params)
                if SLOW_KEY in self.state.get(param, {})}
        state_dict = dict(self.base_optimizer.state_dict())
        if STATE_DICT_KEY in state_dict:
            raise RuntimeError(f"the base optimizer's state dict already has a {STATE_DICT_KEY!r} entry "
                               "(Lookahead around Lookahead is not supported)")
        state_dict[STATE_DICT_KEY] = {"steps": self.lookahead_steps, "slow_params": slow,
                                      **{name: getattr(self, name) for name in _SETTINGS}}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load what :meth:`state_dict` saved: base state, slow weights, step count and settings."""
        if STATE_DICT_KEY not in state_dict:
            raise ValueError(f"not a Lookahead state dict (no {STATE_DICT_KEY!r} entry); to continue from a "
                             "plain optimizer's checkpoint, load it into the base optimizer before wrapping it")
        saved = state_dict[STATE_DICT_KEY]
        settings = {name: saved[name] for name in _SETTINGS}
        _check_settings(**settings)
        params = [param for group in self.param_groups for param in group["params"]]
        slow_params = {int(index): tensor for index, tensor in saved["slow_params"].items()}
        out_of_range = sorted(index for index in slow_params if not 0 <= index < len(params))
        if out_of_range:
            raise ValueError(f"Lookahead state has slow weights for parameter indices {out_of_range}, but this "
                             f"optimizer has {len(params)} parameters")
        for index, tensor in slow_params.items():
            if tensor.shape != params[index].shape:
                raise ValueError(f"Lookahead slow weight {index} has shape {tuple(tensor.shape)}, "
                                 f"the parameter has {tuple(params[index].shape)}")
        self.base_optimizer.load_state_dict({key: value for key, value in state_dict.items()
                                             if key != STATE_DICT_KEY})
        self.state = defaultdict(dict)
        for index, tensor in slow_params.items():
            param = params[index]
            self.state[param][SLOW_KEY] = tensor.to(device=param.device, dtype=param.dtype).clone()
        for name, value in settings.items():
            setattr(self, name, value)
        self.lookahead_steps = int(saved["steps"])

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; a copy needs its base too.
        return self.__dict__.copy()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad`` (the same parameters)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        settings = ", ".join(f"{name}={getattr(self, name)}" for name in _SETTINGS)
        return f"Lookahead({settings}, base_optimizer={self.base_optimizer!r})"


def _check_settings(sync_period: Any, alpha: Any, weight_decay: Any, grad_clip_norm: Any,
                    grad_clip_value: Any) -> None:
    if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period < 1:
        raise ValueError(f"sync_period must be an integer >= 1, got {sync_period!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be >= 0 and finite, got {weight_decay!r}")
    for name, value in (("grad_clip_norm", grad_clip_norm), ("grad_clip_value", grad_clip_value)):
        if value is not None and not (value > 0.0 and math.isfinite(value)):
            raise ValueError(f"{name} must be None or a positive finite number, got {value!r}")
