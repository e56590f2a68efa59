"""Optimizers named by strings, for ``lopt-hf eval``.

Built in (torch.optim):

* ``adamw`` / ``adamw:LR`` — AdamW, lr 1e-3 unless given, weight_decay 0.01 (torch's default);
* ``adamw-grid`` — AdamW at every lr of :data:`ADAMW_GRID`; per task the lr with the lowest final
  training loss is reported (all grid results are kept);
* ``adamw-cosine`` / ``adamw-cosine:LR`` / ``adamw-cosine-grid`` — the same AdamW under the standard
  schedule: linear warmup over the first 5% of the planned steps, then cosine decay to 0
  (:class:`WarmupCosineAdamW`, the schedule a learned rule gets with ``lr_schedule: warmup_cosine``);
* ``adam`` / ``adam:LR`` — Adam, lr 1e-3 unless given;
* ``sgdm`` / ``sgdm:LR`` — SGD with momentum 0.9, lr 0.1 unless given.

Anything else is a learned-optimizer artifact — a local folder, a Hub repo id or a shipped short
name — handed as it is to :func:`lopt_hf.load_lopt`. ``LABEL=SPEC`` sets the display name of any
spec (e.g. ``mine=./runs/x/final``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable

import torch
from torch import nn

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class WarmupCosineAdamW(torch.optim.AdamW):
    """AdamW whose lr follows :func:`~lopt_hf.rules.scheduler.warmup_cosine` over the planned steps.

    Like a learned optimizer it is told the length of training (``set_total_steps``, which the
    evaluation calls); each ``step`` sets every group's lr to its peak ``lr`` times the schedule's value
    before AdamW's update, so an outside constant LR scheduler (Trainer's) does not change it. The
    peak and the steps taken live in the param groups, so ``state_dict`` keeps them.
    """

    def __init__(self, params, lr: float = 1e-3, **settings: float) -> None:
        super().__init__(params, lr=lr, **settings)
        for group in self.param_groups:
            group.setdefault("peak_lr", group["lr"])
            group.setdefault("schedule_step", 0)
        self.total_steps: int | None = None

    def set_total_steps(self, steps: int) -> None:
        """The planned number of steps: the cosine reaches 0 after the last."""
        if int(steps) < 1:
            raise ValueError(f"total steps must be >= 1, got {steps!r}")
        self.total_steps = int(steps)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        if self.total_steps is None:
            raise RuntimeError("WarmupCosineAdamW needs the planned number of steps: call set_total_steps(n) first")
        from ..rules.scheduler import warmup_cosine

        total = torch.tensor(float(self.total_steps))
        for group in self.param_groups:
            group["lr"] = group["peak_lr"] * float(warmup_cosine(torch.tensor(float(group["schedule_step"])), total))
            group["schedule_step"] += 1
        return super().step(closure)

ADAMW_GRID: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
"""Learning rates tried by ``adamw-grid``."""

# name -> (torch class, default lr, other settings)
_BASELINES: dict[str, tuple[type[torch.optim.Optimizer], float, dict[str, float]]] = {
    "adamw": (torch.optim.AdamW, 1e-3, {"weight_decay": 0.01}),
    "adamw-cosine": (WarmupCosineAdamW, 1e-3, {"weight_decay": 0.01}),
    "adam": (torch.optim.Adam, 1e-3, {}),
    "sgdm": (torch.optim.SGD, 0.1, {"momentum": 0.9}),
}
GRID = "adamw-grid"
# grid spec -> the baseline it runs at every lr of ADAMW_GRID
GRIDS = {GRID: "adamw", "adamw-cosine-grid": "adamw-cosine"}
LEARNED = "learned"
SPEC_HELP = ("adamw, adamw:LR, adamw-grid, adamw-cosine, adamw-cosine:LR, adamw-cosine-grid, adam, adam:LR, sgdm, "
             "sgdm:LR, or a learned-optimizer artifact (local folder or Hub repo id 'owner/name'); prefix LABEL= to "
             "name it")


class OptimizerSpecError(ValueError):
    """An optimizer spec that cannot be parsed or loaded."""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A parsed optimizer spec.

    ``kind`` is a single baseline (``"adamw"``, ``"adamw-cosine"``, ``"adam"``, ``"sgdm"``), a grid
    (``"adamw-grid"``, ``"adamw-cosine-grid"``) or ``"learned"``; ``lr`` is set for the single baselines;
    ``source`` is what ``load_lopt`` gets for learned ones.
    """

    spec: str
    label: str
    kind: str
    lr: float | None = None
    source: str | None = None

    @property
    def is_grid(self) -> bool:
        """Whether this spec runs a baseline at every lr of :data:`ADAMW_GRID` and reports the best per task."""
        return self.kind in GRIDS

    @property
    def description(self) -> str:
        """One line saying what runs."""
        if self.kind == LEARNED:
            return f"learned optimizer load_lopt({self.source!r}) (its own lr and settings)"
        if self.is_grid:
            cls, _, settings = _BASELINES[GRIDS[self.kind]]
            name = "AdamW" if cls is torch.optim.AdamW else f"{cls.__name__} (AdamW, warmup 5% + cosine to 0)"
            return (f"{name} (weight_decay {settings['weight_decay']:g}) at lr "
                    f"{', '.join(f'{lr:g}' for lr in ADAMW_GRID)}; per task the lr with the lowest final training loss")
        cls, _, settings = _BASELINES[self.kind]
        extra = "".join(f", {key} {value:g}" for key, value in settings.items())
        return f"{cls.__name__} (lr {self.lr:g}{extra})"

    def candidates(self) -> list[tuple[float | None, OptimizerFactory]]:
        """``(lr, make_optimizer)`` for every run this spec needs per task and seed (4 for the grid)."""
        if self.kind == LEARNED:
            source = self.source

            def make_learned(model: nn.Module) -> torch.optim.Optimizer:
                from ..load import load_lopt

                return load_lopt(source, model)

            return [(None, make_learned)]
        kind = GRIDS.get(self.kind, self.kind)
        lrs = ADAMW_GRID if self.is_grid else (self.lr,)
        return [(lr, _baseline_factory(kind, lr)) for lr in lrs]


def _baseline_factory(kind: str, lr: float) -> OptimizerFactory:
    cls, _, settings = _BASELINES[kind]

    def make(model: nn.Module) -> torch.optim.Optimizer:
        return cls(model.parameters(), lr=lr, **settings)

    return make


def parse_optimizer_spec(spec: str) -> OptimizerSpec:
    """Parse one optimizer spec (see the module documentation); :class:`OptimizerSpecError` if malformed.

    Learned-optimizer specs are not loaded here (see :func:`check_learned_optimizer`), but one that
    is neither a built-in name, an existing path nor a Hub-style ``owner/name`` id is rejected,
    with a suggestion when it looks like a misspelt built-in.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise OptimizerSpecError(f"empty optimizer spec {spec!r}; expected {SPEC_HELP}")
    spec = spec.strip()
    label, body = None, spec
    if "=" in spec and not os.path.exists(spec):
        label, _, body = spec.partition("=")
        label, body = label.strip(), body.strip()
        if not label or not body:
            raise OptimizerSpecError(f"optimizer spec {spec!r}: LABEL=SPEC needs both parts")
    name, colon, argument = body.partition(":")
    lowered = name.strip().lower()
    if lowered in _BASELINES:
        lr = _BASELINES[lowered][1]
        if colon:
            lr = _parse_lr(argument, spec)
        return OptimizerSpec(spec, label or body, lowered, lr=lr)
    if lowered in GRIDS:
        if colon:
            raise OptimizerSpecError(f"optimizer spec {spec!r}: {lowered} takes no learning rate (it tries "
                                     f"{', '.join(f'{lr:g}' for lr in ADAMW_GRID)})")
        return OptimizerSpec(spec, label or body, lowered)
    if "/" not in body and os.sep not in body and not os.path.exists(body):
        close = difflib.get_close_matches(lowered, [*_BASELINES, *GRIDS], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise OptimizerSpecError(f"unknown optimizer {body!r}{hint} (not a built-in name, no such folder, not a Hub "
                                 f"repo id 'owner/name'); expected {SPEC_HELP}")
    return OptimizerSpec(spec, label or body, LEARNED, source=body)


def _parse_lr(text: str, spec: str) -> float:
    try:
        lr = float(text)
    except ValueError:
        raise OptimizerSpecError(f"optimizer spec {spec!r}: learning rate {text!r} is not a number") from None
    if not math.isfinite(lr) or lr <= 0:
        raise OptimizerSpecError(f"optimizer spec {spec!r}: learning rate must be a positive number, got {text!r}")
    return lr


def parse_optimizer_specs(specs: list[str] | tuple[str, ...]) -> list[OptimizerSpec]:
    """Parse several specs; their labels must be distinct."""
    parsed = [parse_optimizer_spec(spec) for spec in specs]
    if not parsed:
        raise OptimizerSpecError(f"no optimizers given; expected {SPEC_HELP}")
    seen: dict[str, str] = {}
    for item in parsed:
        if item.label in seen:
            raise OptimizerSpecError(f"optimizer label {item.label!r} is given twice ({seen[item.label]!r} and "
                                     f"{item.spec!r}); name one with LABEL=SPEC")
        seen[item.label] = item.spec
    return parsed


def check_learned_optimizer(spec: OptimizerSpec) -> None:
    """Load a learned optimizer once on a probe model, so a bad artifact fails before any training."""
    if spec.kind != LEARNED:
        return
    try:
        spec.candidates()[0][1](nn.Linear(4, 3))
    except Exception as error:  # ArtifactError, OSError, hub errors...: all mean "cannot use this spec"
        raise OptimizerSpecError(f"optimizer {spec.spec!r} is not a built-in one and could not be loaded as a "
                                 f"learned-optimizer artifact: {type(error).__name__}: {error}") from error
