"""What an LR schedule (and Trainer's gradient clipping) does to a learned optimizer's step, in words.

For warnings and log notes. A leaf: it reads ``transformers``' ``LambdaLR``-style schedules through
their ``lr_lambdas`` and ``TrainingArguments`` by attribute, without importing transformers, so the
optimizer (which finds a Trainer driving it) and ``LearnedOptimizerCallback`` say the same thing.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["SCHEDULE_PROBES", "describe_clipping", "describe_schedule", "describe_trainer_schedule",
           "on_learned_schedule"]

# A schedule's multiplier is read at every step of training, or at this many evenly spaced steps for longer runs.
SCHEDULE_PROBES = 10_001


def describe_schedule(lr_scheduler: Any, max_steps: int) -> str | None:
    """How a ``LambdaLR``-style scheduler (Trainer's) scales the step over ``max_steps``, in words.

    ``""`` when the multiplier is 1 throughout, ``None`` when it cannot be read without stepping the
    scheduler. The multiplier is read at every step (:data:`SCHEDULE_PROBES` evenly spaced ones in
    longer runs), so the peak after a warmup and the value at the last step are the real ones, e.g.
    ``"×0 at step 0, rising to ×1 at step 20, then falling to ×6.2e-05 at step 199 (the last)"``.
    """
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if not lambdas or max_steps <= 0:
        return None
    if max_steps <= SCHEDULE_PROBES:
        steps = list(range(max_steps))
    else:
        steps = sorted({round(i * (max_steps - 1) / (SCHEDULE_PROBES - 1)) for i in range(SCHEDULE_PROBES)})
    try:
        factors = [float(lambdas[0](step)) for step in steps]
    except Exception:  # noqa: BLE001 -- a stateful or unusual lambda: do not guess
        return None
    if all(math.isclose(factor, 1.0, rel_tol=1e-6) for factor in factors):
        return ""
    peak = max(range(len(factors)), key=factors.__getitem__)
    words = [f"×{factors[0]:.2g} at step 0"]
    if peak > 0 and factors[peak] > factors[0]:
        words.append(f"rising to ×{factors[peak]:.2g} at step {steps[peak]}")
    if factors[-1] < factors[peak] and steps[-1] > steps[peak]:
        words.append(f"{'then ' if peak > 0 else ''}falling to ×{factors[-1]:.2g} at step {steps[-1]} (the last)")
    return ", ".join(words)


def describe_trainer_schedule(args: Any, lr_scheduler: Any, max_steps: int) -> str | None:
    """What ``transformers.Trainer``'s LR scheduler does to the learned step, in one phrase (``None``: nothing).

    ``args`` is the ``TrainingArguments`` (read by attribute: ``lr_scheduler_type``, ``warmup_steps``),
    ``lr_scheduler`` the scheduler Trainer steps, e.g. ``"the LR scheduler (lr_scheduler_type=linear, no
    warmup) multiplies the learned step by ×1 at step 0, falling to ×0.25 at step 3 (the last)"``.
    """
    name = _scheduler_name(args)
    profile = describe_schedule(lr_scheduler, max_steps)
    if profile:
        return (f"the LR scheduler (lr_scheduler_type={name}, {_warmup_text(args, max_steps)}) multiplies the learned "
                f"step by {profile}")
    if profile is None and lr_scheduler is not None and name != "constant":
        return (f"lr_scheduler_type={name} scales the learned step during training (unless you passed your own "
                "scheduler)")
    return None


def on_learned_schedule(schedule: str, rule_name: str) -> str:
    """``schedule`` (:func:`describe_trainer_schedule`) as it applies to a rule with a learned schedule: a mistake."""
    return (f"{schedule}, on top of the schedule rule {rule_name!r} learned: it anneals its own step over the "
            "planned number of steps and was meta-trained with a constant multiplier, so this runs it unlike it was "
            "meta-trained (use lr_scheduler_type='constant' for it)")


def describe_clipping(args: Any) -> str | None:
    """What ``TrainingArguments.max_grad_norm`` does to the gradients a learned rule sees (``None``: nothing)."""
    max_grad_norm = getattr(args, "max_grad_norm", 0) or 0
    if max_grad_norm > 0:
        return (f"max_grad_norm={max_grad_norm} clips the global gradient norm before the learned rule sees the "
                "gradients")
    return None


def _scheduler_name(args: Any) -> str:
    """``args.lr_scheduler_type`` as a plain string (``"constant"`` if unset)."""
    kind = getattr(args, "lr_scheduler_type", "constant")
    return str(getattr(kind, "value", kind))


def _warmup_text(args: Any, max_steps: int) -> str:
    """``"N warmup steps"`` or ``"no warmup"``, from ``args`` as Trainer computes it for ``max_steps``."""
    get_warmup_steps = getattr(args, "get_warmup_steps", None)
    steps = get_warmup_steps(max_steps) if callable(get_warmup_steps) else getattr(args, "warmup_steps", 0)
    return f"{steps:g} warmup steps" if steps else "no warmup"
