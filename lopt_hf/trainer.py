"""``transformers.Trainer`` integration: an optimizer factory and ``LearnedOptimizerCallback``.

Two ways to give ``Trainer`` a learned optimizer; both build the same ``LearnedOptimizer`` as
``load_lopt(artifact, model)`` — the whole model, so harness routing (embeddings, biases → AdamW)
and layouts (``nn.Linear`` vs GPT-2 ``Conv1D`` weights) are those of the model:

* ``Trainer(model, args, optimizers=(load_lopt(path_or_repo, model), None))``
* ``Trainer(model, args, optimizer_cls_and_kwargs=trainer_optimizer(path_or_repo))`` — the
  artifact is loaded (and validated) at once; the optimizer is built when training starts.

What ``Trainer`` does and does not apply to a learned optimizer (both ways):

* ``TrainingArguments.learning_rate`` is **not** used. A learned optimizer's ``lr`` multiplies
  the step it learned; its right value is the artifact's own (``optimizer_defaults["lr"]`` in
  ``config.json``, usually 1.0), and ``5e-5`` — Trainer's default, an AdamW learning rate — would
  all but stop training. Change it on purpose with ``load_lopt(..., lr=...)`` /
  ``trainer_optimizer(..., lr=...)``.
* ``TrainingArguments.weight_decay`` is **not** used either (nor Trainer's "no decay for biases and
  norms" grouping): the artifact's ``weight_decay`` applies unless overridden the same way.
* The LR scheduler **is** applied: it multiplies the optimizer's ``lr`` — the learned step. On a
  character-level GPT-2 (README, "What Trainer's settings mean for a learned optimizer") Trainer's
  default ``lr_scheduler_type="linear"`` with no warmup trained both shipped optimizers better than
  ``"constant"`` (which runs the step exactly as meta-trained), so linear is the recommendation.
  Rules with a learned schedule (``rule.scheduled``: Celo, Celo-Adam, VeLO) anneal their own step
  over the planned number of steps and were meta-trained with a constant multiplier (not measured
  with a Trainer schedule): use ``"constant"`` for them — a decaying one multiplies the learned one.
* ``max_grad_norm`` (default 1.0) clips gradients *before* the rule sees them; ``0`` (no clipping)
  is the recommendation (clipping gave no consistent gain). (``None`` is not accepted by this
  version of Trainer.)
* Gradient accumulation, bf16/fp16, checkpoints (``optimizer.pt``, loaded with
  ``weights_only=True``) and multi-process (DDP) training need nothing special.
* Trainer measures the gradient norm every step with ``clip_grad_norm_(params, inf)`` even when
  ``max_grad_norm=0``; if one gradient holds a NaN/inf, with accelerate ≤ 1.15 that multiplies
  *every* gradient by ``inf / nan``, so the learned optimizer then skips every tensor of that step
  (from 1.16 only the bad tensor; each skip is counted in ``lopt/skipped_nonfinite``) — the
  parameters stay finite.

``LearnedOptimizerCallback`` tells the optimizer the planned number of steps, logs its statistics,
warns once (:class:`LearnedOptimizerSettingsWarning`) about settings that are mistakes — an ``lr``
far below the artifact's, an unused ``learning_rate`` / ``weight_decay``, a non-constant schedule
for a scheduled rule — and logs (``logging.INFO``) what the schedule and clipping do otherwise.
Without the callback, the optimizer's first ``step()`` finds the Trainer driving it and warns once
that the callback is missing, with what Trainer's schedule and clipping do.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .hub import LearnedOptimizerModel
from .load import load_lopt, resolve_artifact
from .lr_schedules import describe_clipping, describe_trainer_schedule, on_learned_schedule
from .optim import ADAMW_ROUTE, LEARNED_ROUTE, ROUTE_KEY, LearnedOptimizer, LearnedOptimizerSettingsWarning
from .warning_location import stacklevel_outside_libraries

__all__ = ["LearnedOptimizerCallback", "LearnedOptimizerFactory", "LearnedOptimizerSettingsWarning",
           "trainer_optimizer", "unwrap_optimizer"]

logger = logging.getLogger(__name__)

# A learning rate this far below the artifact's own is almost surely an AdamW learning rate
# (Trainer's default 5e-5) used as the multiplier of a learned step.
TINY_LR_RATIO = 0.01
# Prefix of the keys LearnedOptimizerCallback adds to Trainer's logs.
LOG_PREFIX = "lopt/"


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside wrappers such as Accelerate's ``AcceleratedOptimizer``."""
    seen = set()
    while not isinstance(optimizer, LearnedOptimizer) and hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


# ================================================================================== factory


class LearnedOptimizerFactory:
    """What ``trainer_optimizer`` hands to ``Trainer(optimizer_cls_and_kwargs=...)``.

    transformers (≥ 5.x) treats an ``optimizer_cls`` that is not a ``torch.optim.Optimizer``
    subclass as a factory: it calls ``optimizer_cls()(model, **kwargs)``, so the optimizer is built
    from the whole model, exactly like ``load_lopt(artifact, model, **overrides)``.

    Trainers that instead call ``optimizer_cls(param_groups, **kwargs)`` (older transformers) get a
    ``LearnedOptimizer`` over those groups; their ``weight_decay`` entries (from
    ``args.weight_decay``) then apply, and without the model, layouts follow
    :func:`lopt_hf.layout.default_layout` and harnesses route by tensor rank only.
    """

    def __new__(cls, params: Any = None, **kwargs: Any) -> Any:
        if params is None:
            return super().__new__(cls)
        return cls._build(params, **kwargs)

    def __call__(self, model: nn.Module, **kwargs: Any) -> LearnedOptimizer:
        return self._build(model, **kwargs)

    @staticmethod
    def _build(params_or_model: Any, artifact: LearnedOptimizerModel | None = None,
               **overrides: Any) -> LearnedOptimizer:
        if not isinstance(artifact, LearnedOptimizerModel):
            raise TypeError("LearnedOptimizerFactory needs artifact=<LearnedOptimizerModel>; build its arguments with "
                            "lopt_hf.trainer_optimizer(path_or_repo)")
        optimizer = load_lopt(artifact, params_or_model, **overrides)
        label = artifact.config.name_or_path or "the artifact"
        logger.info("learned optimizer for Trainer: %s from %s; lr=%s, weight_decay=%s (TrainingArguments."
                    "learning_rate and weight_decay are not used)", artifact.rule.name, label,
                    optimizer.defaults["lr"], optimizer.defaults["weight_decay"])
        return optimizer


def trainer_optimizer(repo_or_path: str | os.PathLike[str] | LearnedOptimizerModel,
                      **overrides: Any) -> tuple[type[LearnedOptimizerFactory], dict[str, Any]]:
    """``(optimizer_cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Args:
        repo_or_path: local artifact folder, Hub repo id or loaded ``LearnedOptimizerModel``;
            loaded and validated now (errors surface before training starts).
        **overrides: as for :func:`lopt_hf.load_lopt`: ``lr``, ``weight_decay``, ``chunk_size``, ``compile``,
            ``harness`` (used when Trainer builds the optimizer) and the Hub options ``revision``,
            ``cache_dir``, ``token``, ``local_files_only``, ``force_download`` (used now).

    The optimizer's ``lr`` and ``weight_decay`` are the artifact's (or ``overrides``), never
    ``TrainingArguments.learning_rate`` / ``weight_decay`` — see the module documentation.
    """
    artifact, overrides = resolve_artifact(repo_or_path, overrides, caller="trainer_optimizer")
    return LearnedOptimizerFactory, {"artifact": artifact, **overrides}


# ================================================================================= callback


class LearnedOptimizerCallback(TrainerCallback):
    """``transformers.TrainerCallback`` for learned optimizers.

    * At the start of training: ``optimizer.set_total_steps(state.max_steps)`` (rules that need
      the planned length of training read it from there), and (main process only) one
      :class:`LearnedOptimizerSettingsWarning` listing the settings that are mistakes for this
      optimizer (:func:`settings_problems`: a learning rate far below the artifact's, an unused
      ``args.learning_rate`` / ``args.weight_decay``, a non-constant LR schedule for a rule with a
      learned schedule) and one ``logging.INFO`` note of what the LR schedule and gradient clipping
      do to the learned step otherwise (:func:`settings_notes`).
    * At each log: adds ``lopt/update_rms`` (RMS of the last step's parameter change through the
      learned rule), ``lopt/update_rms_adamw`` (AdamW-routed tensors, if any) and
      ``lopt/skipped_nonfinite`` (tensor-steps skipped so far for a non-finite gradient or step)
      to the logs, and to ``state.log_history``.

    * For rules that need the training loss (``rule.needs_loss``, e.g. opt2vec): right before each
      optimizer step, hands the optimizer the loss of the step's batch (the sum of the
      micro-batch losses ``training_step`` returned — Trainer's own accumulation arithmetic —
      averaged over processes so every rank applies the same update). Trainer's callback events do
      not carry the loss, so this needs :meth:`attach`, which also watches ``training_step``.

    Trainer runs reporting integrations (``report_to``: TensorBoard, W&B, ...) *before* callbacks
    passed as ``callbacks=[...]``, so those would not see these keys: use :meth:`attach` to put the
    callback first.

    Does nothing (and says so once) if the optimizer is not a ``LearnedOptimizer``.

    Args:
        warn: emit the settings warning (default ``True``; the INFO note is logged either way).
        log_stats: add the statistics to the logs (default ``True``).
    """

    def __init__(self, warn: bool = True, log_stats: bool = True) -> None:
        self.warn = warn
        self.log_stats = log_stats
        self._checked = False
        self._not_learned_noted = False
        self._trainer: Any = None
        self._window_loss: torch.Tensor | None = None

    @classmethod
    def attach(cls, trainer: Any, **kwargs: Any) -> LearnedOptimizerCallback:
        """Add a new callback to ``trainer`` *first* and let it see each batch's training loss.

        First, so reporting integrations see its log keys; the loss (from ``training_step``'s
        return value) feeds rules with ``needs_loss``.
        """
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        callback._watch_training_step(trainer)
        return callback

    def _watch_training_step(self, trainer: Any) -> None:
        original = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = original(*args, **kwargs)
            if isinstance(loss, torch.Tensor):
                step_loss = loss.detach().float()
                self._window_loss = step_loss if self._window_loss is None else self._window_loss + step_loss
            return loss

        trainer.training_step = training_step
        self._trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        learned = unwrap_optimizer(optimizer)
        loss, self._window_loss = self._window_loss, None
        if loss is None or not isinstance(learned, LearnedOptimizer) or not learned.rule.needs_loss:
            return
        if self._trainer is not None and self._trainer.accelerator.num_processes > 1:
            loss = self._trainer.accelerator.reduce(loss, reduction="mean")
        learned.record_loss(loss)

    # --------------------------------------------------------------------------- events
    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, lr_scheduler: Any = None,
                       **kwargs: Any) -> None:
        learned = unwrap_optimizer(optimizer)
        if not isinstance(learned, LearnedOptimizer):
            if not self._not_learned_noted:
                logger.info("LearnedOptimizerCallback: the optimizer is %s, not a LearnedOptimizer; doing nothing",
                            type(learned).__name__)
                self._not_learned_noted = True
            return
        learned.settings_checked = True  # checked here: the optimizer need not look for a Trainer itself
        if learned.rule.needs_loss and self._trainer is None:
            raise RuntimeError(f"rule {learned.rule.name!r} needs the training loss, which Trainer's callback events "
                               "do not carry: add the callback with LearnedOptimizerCallback.attach(trainer) "
                               "(instead of callbacks=[...]) so it can read each batch's loss")
        if state.max_steps and state.max_steps > 0:
            learned.set_total_steps(int(state.max_steps))
        if not self._checked and state.is_local_process_zero:
            self._checked = True
            max_steps = int(state.max_steps or 0)
            notes = settings_notes(args, learned, lr_scheduler, max_steps)
            if notes:
                logger.info("Trainer settings for the learned optimizer %s: %s", learned.rule.name, "; ".join(notes))
            problems = settings_problems(args, learned, lr_scheduler, max_steps) if self.warn else []
            if problems:
                warnings.warn("Trainer settings change what the learned optimizer does:\n"
                              + "\n".join(f"  - {problem}" for problem in problems)
                              + "\n(the optimizer's lr is the artifact's unless you pass lr= to load_lopt / "
                                "trainer_optimizer; README, 'What Trainer's settings mean for a learned optimizer'; "
                                "LearnedOptimizerCallback(warn=False) silences this)",
                              LearnedOptimizerSettingsWarning, stacklevel=stacklevel_outside_libraries())

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, optimizer: Any = None,
               **kwargs: Any) -> None:
        learned = unwrap_optimizer(optimizer)
        if not self.log_stats or logs is None or not isinstance(learned, LearnedOptimizer):
            return
        if "loss" not in logs:  # training logs only (not eval / the final summary)
            return
        stats = learned.last_step_stats()
        extra: dict[str, float] = {}
        for key in ("update_rms", "update_rms_adamw"):
            if key in stats:
                extra[LOG_PREFIX + key] = stats[key]
        extra[LOG_PREFIX + "skipped_nonfinite"] = learned.num_skipped_nonfinite
        logs.update(extra)
        # Trainer.log appended a copy of `logs` to the history before calling us: add ours there too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step \
                and state.log_history[-1].get("loss") == logs.get("loss"):
            state.log_history[-1].update(extra)


def settings_problems(args: Any, optimizer: LearnedOptimizer, lr_scheduler: Any, max_steps: int) -> list[str]:
    """Trainer settings that are mistakes for this learned optimizer, in words (empty: none).

    An ``lr`` far below the artifact's (an AdamW learning rate used as the multiplier of a learned
    step), ``TrainingArguments.learning_rate`` / ``weight_decay`` set to values the optimizer does not
    use, and — for rules with a learned schedule (``rule.scheduled``) only — an LR schedule that is not
    constant, which multiplies the schedule the rule learned. For other rules the schedule and
    gradient clipping are choices (see :func:`settings_notes`).
    """
    problems = []
    learned_groups = [g for g in optimizer.param_groups if g.get(ROUTE_KEY, LEARNED_ROUTE) != ADAMW_ROUTE]
    groups = learned_groups or optimizer.param_groups
    base_lr = float(groups[0].get("initial_lr", groups[0]["lr"]))

    schedule = describe_trainer_schedule(args, lr_scheduler, max_steps)
    if schedule and optimizer.rule.scheduled:
        problems.append(on_learned_schedule(schedule, optimizer.rule.name))

    reference_lr = float(optimizer.artifact_defaults.get("lr", 1.0))
    if reference_lr > 0 and base_lr < TINY_LR_RATIO * reference_lr:
        problems.append(f"the learned optimizer's lr is {base_lr:g}, {reference_lr / max(base_lr, 1e-300):.3g}x "
                        f"smaller than the artifact's {reference_lr:g}: lr multiplies the learned step (it is not "
                        "an AdamW learning rate), so training will barely move")
    args_lr = getattr(args, "learning_rate", None)
    if args_lr is not None and not math.isclose(float(args_lr), base_lr, rel_tol=1e-6):
        problems.append(f"TrainingArguments.learning_rate={args_lr:g} is not used: the learned optimizer's lr is "
                        f"{base_lr:g} (the artifact's, or what you passed to load_lopt / trainer_optimizer)")
    args_wd = getattr(args, "weight_decay", 0.0) or 0.0
    group_wds = sorted({float(g["weight_decay"]) for g in optimizer.param_groups})
    if args_wd > 0 and group_wds != [float(args_wd)]:
        problems.append(f"TrainingArguments.weight_decay={args_wd:g} is not used: the learned optimizer's "
                        f"weight_decay is {', '.join(f'{wd:g}' for wd in group_wds)} (pass weight_decay= to "
                        "load_lopt / trainer_optimizer to change it)")
    return problems


def settings_notes(args: Any, optimizer: LearnedOptimizer, lr_scheduler: Any, max_steps: int) -> list[str]:
    """What Trainer's LR schedule and gradient clipping do to the learned step, in words — not mistakes:
    for rules without a learned schedule a linear decay trained best in the README's measurement.
    The schedule of a scheduled rule is in :func:`settings_problems` instead."""
    schedule = describe_trainer_schedule(args, lr_scheduler, max_steps)
    notes = [schedule] if schedule and not optimizer.rule.scheduled else []
    clipping = describe_clipping(args)
    return notes + ([clipping] if clipping else [])
