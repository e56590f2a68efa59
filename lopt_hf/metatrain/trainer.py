"""The meta-training outer loop on 🤗 Accelerate: ``MetaTrainer`` and the ``metatrain`` command.

One outer step:

1. every process runs the meta-gradient estimator on its own contiguous block of global task
   ids (process ``r`` of ``W`` owns ids ``[r·N/W, (r+1)·N/W)`` of the ``N = estimator.num_tasks``
   slots); the estimator seeds all randomness of a slot by ``(seed, global task id, outer
   step)``, so how the ids are split does not change what is computed;
2. the per-process sums (meta-gradient, meta-loss, task count) are all-reduced (sum) in one
   flat tensor and divided by the total task count — 2 processes give the 1-process
   meta-gradient up to float summation order;
3. AdamW updates theta (the same on every process), after optional global-norm clipping;
   a non-finite meta-gradient skips the update (counted in ``skipped_updates``).

Around it: a tqdm bar on the main process (meta-loss, steps/s, ETA), Accelerate trackers
(TensorBoard by default: ``<run>/logs``), atomic checkpoints every ``checkpoint_every`` steps
(``lopt_hf.metatrain.checkpoint``; ``--resume`` continues bit-for-bit from the newest *intact*
checkpoint: a damaged newer one is reported by file and moved aside to ``damaged-step-…``), SIGINT /
SIGTERM handled at the end of the current outer step (checkpoint, resume command, exit status
130 / 143: :mod:`lopt_hf.metatrain.interrupt`) and the meta-loss plot
``<run>/meta_loss.png``. Exporting the final checkpoint as an artifact (``<run>/final``, with its
evaluated model card, optionally pushed to the Hub) is publishing's job: the ``metatrain``
command (:mod:`lopt_hf.publish.metatrain_command`) trains, then exports.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..plotting import plot_meta_loss
from ..rules import build_rule
from .checkpoint import (CheckpointData, CheckpointError, capture_rng_state, checkpoint_dir_name, list_checkpoints,
                         load_checkpoint, newest_intact_checkpoint, restore_rng_state, save_checkpoint,
                         verify_checkpoint)
from .config import ConfigError, MetaTrainConfig, config_from_dict, frozen_theta_keys
from .interrupt import MetaTrainingInterrupted, StopSignals, resume_command

__all__ = ["MetaTrainer", "TrainResult", "task_block", "initial_theta"]

# Config keys a resumed run may change; anything else must match the checkpoint.
RESUMABLE_CHANGES = ("outer_steps", "checkpoint_every", "keep_checkpoints", "log_every", "log_with", "output_dir",
                     "push_to_hub", "card", "evaluation", "num_threads")


def task_block(num_tasks: int, rank: int, world_size: int) -> list[int]:
    """The contiguous block of global task ids process ``rank`` of ``world_size`` owns."""
    if world_size > num_tasks:
        raise ConfigError(f"estimator.num_tasks ({num_tasks}) must be >= the number of processes ({world_size}): "
                          f"every process needs at least one task slot")
    start = rank * num_tasks // world_size
    stop = (rank + 1) * num_tasks // world_size
    return list(range(start, stop))


# Rule options a fine-tune may change from its artifact's (rule.init_from): how the scheduler's lr_mult is used,
# the direction of matrices, and (only false -> true) the scheduler's per-tensor inputs. Any other difference
# means a different optimizer and is refused.
FINE_TUNE_OPTIONS = ("lr_schedule", "orthogonalize", "tensor_features")


def initial_theta(config: MetaTrainConfig) -> dict[str, Tensor]:
    """The meta-parameters meta-training starts from: ``rule.init_theta`` seeded with ``config.seed``,
    or the theta of the artifact ``rule.init_from`` (fine-tuning), whose rule and hyper-parameters
    must be the configured ones except :data:`FINE_TUNE_OPTIONS` — e.g. Celo's phase 2 starts from a
    phase-1 artifact (``lr_schedule: constant``), and a ``celo_adam`` without ``tensor_features`` may
    start one with them (its scheduler widened by zero weights, :meth:`ScheduledRule.with_summary_inputs`)."""
    rule = build_rule(config.rule.name, **config.rule.config)
    source = config.rule.init_from
    if source is None:
        return rule.init_theta(torch.Generator().manual_seed(config.seed))
    from ..hub import load_artifact

    artifact = load_artifact(source)
    if artifact.rule.name != rule.name:
        raise ConfigError(f"rule.init_from: {source} holds rule {artifact.rule.name!r}, the config trains "
                          f"{rule.name!r}")
    theirs, ours = artifact.rule.hyperparameters(), rule.hyperparameters()
    differ = sorted(key for key in set(theirs) | set(ours) if theirs.get(key) != ours.get(key))
    # (a fine-tune may add the scheduler's per-tensor inputs, not drop them)
    refused = [key for key in differ if key not in FINE_TUNE_OPTIONS or (key == "tensor_features" and not ours[key])]
    if refused:
        details = ", ".join(f"{key}: artifact {theirs.get(key)!r}, config {ours.get(key)!r}" for key in refused)
        raise ConfigError(f"rule.init_from: {source} has other {rule.name} hyper-parameters than rule.config "
                          f"({details}); set rule.config to the artifact's")
    theta = {name: value.to(torch.float32) for name, value in artifact.theta().items()}
    if "tensor_features" in differ:
        return rule.with_summary_inputs(theta)  # the artifact's scheduler, plus zero weights on the new inputs
    return theta


@dataclass
class TrainResult:
    """What :meth:`MetaTrainer.train` returns (on every process)."""

    run_dir: Path
    final_step: int
    theta: dict[str, Tensor]
    meta_losses: list[float]
    elapsed_s: float
    # <run>/final: set by lopt_hf.publish.train_and_export on the main process (MetaTrainer does not export)
    artifact_dir: Path | None = None


class MetaTrainer:
    """Meta-trains ``config.rule`` on ``config.task`` with ``config.estimator``.

    Args:
        config: the run's config.
        resume: ``False`` (fresh run; refuses a run folder that already has checkpoints),
            ``True`` (continue from the newest checkpoint in ``<run>/checkpoints``; a fresh start
            if there is none) or a checkpoint folder.
        accelerator: an ``accelerate.Accelerator`` (default: a new one logging to
            ``config.log_with`` under ``<run>``).
        progress: show the tqdm bar (main process only).
    """

    def __init__(self, config: MetaTrainConfig, *, resume: bool | str | os.PathLike[str] = False,
                 accelerator: Any = None, progress: bool = True) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.run_dir = config.run_dir
        self.checkpoint_root = self.run_dir / "checkpoints"
        if accelerator is None:
            project = ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs"))
            # Launched as several processes (accelerate launch --multi_gpu / torchrun) on a machine
            # without CUDA, Accelerate needs cpu=True to form a gloo group; otherwise every process
            # would believe it is alone (rank 0 of 1).
            distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
            accelerator = Accelerator(log_with=list(config.log_with) or None, project_config=project,
                                      cpu=distributed and not torch.cuda.is_available())
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        self.progress = progress
        self.task_ids = task_block(config.estimator.num_tasks, self.rank, self.world_size)

        from .estimators import build_estimator
        from .mixture import TaskMixture
        from .tasks import build_task_family

        self.rule = build_rule(config.rule.name, **config.rule.config)
        families = []
        for index, section in enumerate(config.task_sections()):
            try:
                families.append(build_task_family(section.family, **section.family_options()))
            except ValueError as err:  # e.g. an unreadable task.text_file: one line from the command, no traceback
                raise ConfigError(f"{'task' if index == 0 else f'extra_tasks[{index - 1}]'}: {err}") from None
        self.task_families = families
        self.task_family = families[0]
        estimator = config.estimator
        self.names = list(self.rule.theta_shapes())
        self.frozen = frozen_theta_keys(self.names, config.meta_optimizer.frozen)
        options = {**estimator.options(config.seed), "frozen": tuple(self.frozen)}
        if config.lolo is not None:  # LoLO: PES + replay buffer / behaviour cloning; α_t needs the outer-step total
            from .lolo import LoLOPES

            estimators = [LoLOPES(family, self.rule, lolo=dict(config.lolo), total_outer_steps=config.outer_steps,
                                  **options) for family in families]
        else:
            estimators = [build_estimator(estimator.name, family, self.rule, **options) for family in families]
        # a mixture: one estimator (and, with LoLO, one replay buffer per slot) per family
        self.estimator = estimators[0] if len(estimators) == 1 else TaskMixture(estimators)

        checkpoint = self._checkpoint_to_resume(resume)
        # A resumed run takes theta from its checkpoint: the starting theta (maybe an artifact to
        # download, rule.init_from) is not needed then.
        theta = initial_theta(config) if checkpoint is None else {
            name: torch.zeros(shape) for name, shape in self.rule.theta_shapes().items()}
        self.theta = {name: theta[name].to(self.device, torch.float32).clone() for name in self.names}
        meta = config.meta_optimizer
        self.meta_optimizer = torch.optim.AdamW([self.theta[name] for name in self.names], lr=meta.lr,
                                                betas=tuple(meta.betas), eps=meta.eps, weight_decay=meta.weight_decay)
        self.step = 0
        self.history: dict[str, list[float]] = {"step": [], "meta_loss": [], "grad_norm": []}
        # a mixture also records each family's mean meta-loss (metrics.csv, meta_loss.png)
        self.family_series = [f"meta_loss/{index}" for index in range(len(families))] if len(families) > 1 else []
        self.history.update({key: [] for key in self.family_series})
        self.elapsed_s = 0.0
        self.skipped_updates = 0
        self.last_meta_gradient: dict[str, Tensor] | None = None
        self.estimator_state: dict[str, Tensor] = {}
        self.stop_signals: StopSignals | None = None  # set while train() runs
        self.stop_requested = False  # some process got SIGINT/SIGTERM (agreed on by the all-reduce)

        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            self.estimator_state = self.estimator.init_state(self._theta_copy(), self.task_ids, 0)
        self._save_config()

    # ------------------------------------------------------------------------------ resume
    def _checkpoint_to_resume(self, resume: bool | str | os.PathLike[str]) -> Path | None:
        if resume is False or resume is None:
            if list_checkpoints(self.checkpoint_root):
                raise CheckpointError(f"{self.checkpoint_root} already holds checkpoints: pass --resume to continue "
                                      f"that run, or choose another output_dir / name")
            return None
        if resume is True:
            return self._newest_intact(self.checkpoint_root)
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            root = path / "checkpoints" if list_checkpoints(path / "checkpoints") else path
            found = self._newest_intact(root)
            if found is None:
                raise CheckpointError(f"{path}: no checkpoint to resume from")
            return found
        verify_checkpoint(path)  # a checkpoint named explicitly: damage is an error, no fallback
        return path

    def _newest_intact(self, root: Path) -> Path | None:
        """The newest checkpoint under ``root`` that passes :func:`verify_checkpoint` (None: there are none).

        Damaged newer ones are reported (one line each) and renamed ``damaged-step-…`` by the main
        process, out of the listing (so pruning cannot delete the intact one in their favour) but
        kept for inspection. Every process reaches the same verdict: the checks are deterministic.
        """
        found, reported = newest_intact_checkpoint(root)
        damaged = [path for path, _ in reported]
        if self.is_main:
            for _, reason in reported:
                print(f"damaged checkpoint: {reason}", file=sys.stderr)
        if damaged:
            if found is None:
                raise CheckpointError(f"{root}: all {len(damaged)} checkpoint(s) are damaged (see above); "
                                      f"nothing to resume from")
            self.accelerator.wait_for_everyone()  # every process has checked them before they move
            if self.is_main:
                for path in damaged:
                    aside = path.with_name(f"damaged-{path.name}")
                    suffix = 1
                    while aside.exists():
                        aside, suffix = path.with_name(f"damaged-{path.name}.{suffix}"), suffix + 1
                    os.replace(path, aside)
                print(f"falling back to {found}, the newest intact checkpoint (damaged ones moved to "
                      f"{', '.join(f'damaged-{path.name}' for path in damaged)})", file=sys.stderr)
            self.accelerator.wait_for_everyone()
        return found

    def _restore(self, path: Path) -> None:
        data = load_checkpoint(path, rank=self.rank, num_processes=self.world_size, task_ids=self.task_ids,
                               device=self.device)
        saved = config_from_dict(data.config, source=f"{path}/trainer_state.json", stored=True).to_dict()
        current = self.config.to_dict()
        changed = sorted(key for key in current if key not in RESUMABLE_CHANGES and saved.get(key) != current[key])
        if changed:
            details = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, now {current[key]!r}" for key in changed)
            raise CheckpointError(f"{path}: the config differs from the checkpoint's in {changed} ({details}); "
                                  f"only {list(RESUMABLE_CHANGES)} may change on resume")
        self._check_restored(path, data)
        with torch.no_grad():
            for name in self.names:
                self.theta[name].copy_(data.theta[name])
        try:
            self.meta_optimizer.load_state_dict(data.meta_optimizer)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}/meta_optimizer.safetensors: not this run's meta-optimizer state "
                                  f"({type(err).__name__}: {' '.join(str(err).split())[:160]})") from None
        self.estimator_state = data.estimator_state
        self.step = data.step
        self.history = {key: list(values) for key, values in data.history.items()}
        for key in self.family_series:  # a checkpoint written before families were recorded: unknown so far
            self.history.setdefault(key, [math.nan] * len(self.history["step"]))
        self.elapsed_s = data.elapsed_s
        self.skipped_updates = int(data.extra.get("skipped_updates", 0))
        restore_rng_state(data.rng)
        if self.is_main:
            print(f"resumed from {path} (outer step {self.step})", file=sys.stderr)

    def _check_restored(self, path: Path, data: CheckpointData) -> None:
        """Theta, meta-optimizer and estimator state have the names, shapes and dtypes this run makes."""
        shapes = self.rule.theta_shapes()
        wrong = sorted(set(self.names) ^ set(data.theta)) + sorted(
            name for name in self.names if name in data.theta and tuple(data.theta[name].shape) != tuple(shapes[name]))
        if wrong:
            raise CheckpointError(f"{path}/theta.safetensors: theta does not fit rule {self.config.rule.name} "
                                  f"(missing, extra or mis-shaped: {wrong})")
        for index, name in enumerate(self.names):
            for key, value in data.meta_optimizer.get("state", {}).get(index, {}).items():
                if key != "step" and (not isinstance(value, Tensor) or value.shape != data.theta[name].shape):
                    raise CheckpointError(f"{path}/meta_optimizer.safetensors: state {key!r} of {name} is "
                                          f"mis-shaped")
        expected = self.estimator.init_state(self._theta_copy(), self.task_ids, data.step)
        state = data.estimator_state
        bad = sorted(set(expected) ^ set(state)) + sorted(
            key for key in expected if key in state
            and (state[key].shape != expected[key].shape or state[key].dtype != expected[key].dtype))
        if bad:
            raise CheckpointError(f"{path}/rank{self.rank}.safetensors: the estimator state does not fit this "
                                  f"run's estimator (missing, extra or mis-shaped: {bad[:6]})")

    def _save_config(self) -> None:
        if self.is_main:
            import yaml

            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
            (self.run_dir / "config.yaml").write_text(text, encoding="utf-8")

    # ------------------------------------------------------------------------------- steps
    def _theta_copy(self) -> dict[str, Tensor]:
        # A copy: estimators may keep what they are given, and AdamW updates theta in place.
        return {name: value.detach().clone() for name, value in self.theta.items()}

    def meta_gradient(self) -> tuple[dict[str, Tensor], float, dict[str, float]]:
        """Estimate this step's meta-gradient (averaged over all processes' tasks) and advance the estimator state.

        Returns ``(meta_gradient, meta_loss, stats)``; does not update theta.
        """
        result = self.estimator.estimate(self._theta_copy(), self.estimator_state, self.task_ids, self.step)
        stat_names = sorted(result.stats)
        pieces = [result.grad_sum[name].detach().reshape(-1).to(self.device, torch.float32) for name in self.names]
        pieces.append(torch.as_tensor(result.meta_loss_sum, dtype=torch.float32, device=self.device).reshape(1).detach())
        pieces.append(torch.tensor([float(result.num_tasks)], dtype=torch.float32, device=self.device))
        pieces.append(torch.tensor([float(result.stats[name]) for name in stat_names], dtype=torch.float32,
                                   device=self.device))
        # Last: whether this process got SIGINT/SIGTERM; summed, so every process stops after the same step.
        signalled = self.stop_signals is not None and self.stop_signals.requested is not None
        pieces.append(torch.tensor([float(signalled)], dtype=torch.float32, device=self.device))
        flat = torch.cat(pieces)
        if self.world_size > 1:
            flat = self.accelerator.reduce(flat, reduction="sum")
        total_grad = sum(self.theta[name].numel() for name in self.names)
        total_tasks = float(flat[total_grad + 1])
        if round(total_tasks) != self.config.estimator.num_tasks:
            raise RuntimeError(f"the estimator reported {total_tasks:g} tasks over all processes, expected "
                               f"estimator.num_tasks = {self.config.estimator.num_tasks}")
        grads, offset = {}, 0
        for name in self.names:
            size = self.theta[name].numel()
            grads[name] = (flat[offset:offset + size] / total_tasks).reshape(self.theta[name].shape)
            offset += size
        meta_loss = float(flat[total_grad]) / total_tasks
        stats = {name: float(value) / self.world_size
                 for name, value in zip(stat_names, flat[total_grad + 2:-1].tolist())}
        self.stop_requested = self.stop_requested or bool(flat[-1] > 0)
        self.estimator_state = result.new_state
        return grads, meta_loss, stats

    def outer_step(self) -> dict[str, float]:
        """One outer step (estimate, all-reduce, clip, AdamW); returns the logged values."""
        grads, meta_loss, stats = self.meta_gradient()
        for name in self.frozen:  # zero already under ES/PES; BPTT differentiates them too
            grads[name] = torch.zeros_like(grads[name])
        self.last_meta_gradient = grads
        grad_norm = float(torch.sqrt(sum(torch.sum(g.double() ** 2) for g in grads.values())))
        finite = math.isfinite(grad_norm)
        if finite:
            clip = self.config.meta_optimizer.grad_clip
            scale = min(1.0, clip / (grad_norm + 1e-12)) if clip else 1.0
            for name in self.names:  # a frozen entry has no .grad, so AdamW leaves it (and its weight decay) alone
                if name not in self.frozen:
                    self.theta[name].grad = grads[name] * scale if scale != 1.0 else grads[name]
            self.meta_optimizer.step()
            self.meta_optimizer.zero_grad(set_to_none=True)
        else:
            self.skipped_updates += 1
        self.step += 1
        self.history["step"].append(self.step)
        self.history["meta_loss"].append(meta_loss)
        self.history["grad_norm"].append(grad_norm)
        for key in self.family_series:
            self.history[key].append(stats[key])
        return {"meta_loss": meta_loss, "grad_norm": grad_norm, "skipped_updates": float(self.skipped_updates),
                **{f"estimator/{key}": value for key, value in stats.items()}}

    # ------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step (collective: every process calls it)."""
        data = CheckpointData(step=self.step, theta=self.theta, meta_optimizer=self.meta_optimizer.state_dict(),
                              estimator_state=self.estimator_state, config=self.config.to_dict(),
                              history=self.history, num_processes=self.world_size, elapsed_s=self.elapsed_s,
                              rng=capture_rng_state(),
                              extra={"skipped_updates": self.skipped_updates,
                                     "task_family": self.task_family.config(),
                                     "extra_task_families": [family.config() for family in self.task_families[1:]]},
                              task_ids=self.task_ids)
        path = save_checkpoint(self.checkpoint_root, data, rank=self.rank, barrier=self.accelerator.wait_for_everyone,
                               keep=self.config.keep_checkpoints)
        if self.is_main:
            self._write_curves()
        return path

    def _write_curves(self) -> None:
        if self.history["meta_loss"]:
            plot_meta_loss(self.history, self.run_dir / "meta_loss.png", title=f"{self.config.name}: meta-loss",
                           series_labels=self._family_labels())
        columns = ["step", "meta_loss", "grad_norm", *self.family_series]
        lines = [",".join(columns)]
        lines += [",".join(repr(value) for value in row) for row in zip(*(self.history[key] for key in columns))]
        tmp = self.run_dir / f".metrics.csv.tmp-{os.getpid()}"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, self.run_dir / "metrics.csv")

    def _family_labels(self) -> dict[str, str]:
        """Legend labels of the per-family series: ``0: mlp_image (fashion_mnist)``, ``2: char_lm (python_docs)`` …"""
        labels = {}
        for key, section in zip(self.family_series, self.config.task_sections()):
            data = section.datasets() or [section.corpus or os.path.basename(section.text_file or "")]
            labels[key] = f"{key.split('/')[1]}: {section.family} ({'+'.join(data)})"
        return labels

    # ------------------------------------------------------------------------------ train
    def train(self, *, stop_after: int | None = None) -> TrainResult:
        """Run outer steps up to ``config.outer_steps`` (or ``stop_after`` more), then checkpoint.

        The final checkpoint is the newest in ``<run>/checkpoints``; ``lopt_hf.publish`` exports it.
        """
        from tqdm.auto import tqdm

        config = self.config
        target = config.outer_steps if stop_after is None else min(config.outer_steps, self.step + stop_after)
        trackers = bool(config.log_with)
        if trackers:
            self.accelerator.init_trackers(config.name, config=_tracker_hparams(config.to_dict()))
        bar = tqdm(total=config.outer_steps, initial=self.step, desc=config.name, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.is_main), smoothing=0.1)
        start = time.perf_counter()
        elapsed_before = self.elapsed_s
        saved_at = -1
        self.stop_requested = False
        try:
            with StopSignals(announce=self.is_main) as self.stop_signals:
                saved_at = self._loop(target, bar, start, elapsed_before, trackers)
                if self.stop_requested:
                    self._stop_on_signal(saved_at, trackers)
        finally:
            bar.close()
            self.stop_signals = None
        if saved_at != self.step:
            self.save_checkpoint()
        self.accelerator.wait_for_everyone()
        if trackers:
            self.accelerator.end_training()
        return TrainResult(run_dir=self.run_dir, final_step=self.step,
                           theta={name: value.detach().cpu().clone() for name, value in self.theta.items()},
                           meta_losses=list(self.history["meta_loss"]), elapsed_s=self.elapsed_s)

    def _loop(self, target: int, bar: Any, start: float, elapsed_before: float, trackers: bool) -> int:
        """Outer steps up to ``target`` (or a stop request); returns the step of the last checkpoint written."""
        config = self.config
        saved_at = -1
        recent: list[float] = []
        while self.step < target and not self.stop_requested:
            values = self.outer_step()
            self.elapsed_s = elapsed_before + time.perf_counter() - start
            recent = (recent + [values["meta_loss"]])[-config.log_every:]
            bar.update(1)
            bar.set_postfix(meta_loss=f"{values['meta_loss']:.4f}",
                            avg=f"{sum(recent) / len(recent):.4f}", refresh=False)
            if trackers and (self.step % config.log_every == 0 or self.step == target):
                self.accelerator.log({**values, "meta_loss_avg": sum(recent) / len(recent),
                                      "elapsed_s": self.elapsed_s}, step=self.step)
            if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.step < target:
                self.save_checkpoint()
                saved_at = self.step
        return saved_at

    def _stop_on_signal(self, saved_at: int, trackers: bool) -> None:
        """Checkpoint the current step (unless just written), say how to resume, raise MetaTrainingInterrupted."""
        path = self.checkpoint_root / checkpoint_dir_name(self.step)
        if saved_at != self.step:
            path = self.save_checkpoint()
        self.accelerator.wait_for_everyone()
        if trackers:
            self.accelerator.end_training()
        requested = self.stop_signals.requested if self.stop_signals is not None else None
        signum = requested if requested is not None else signal.SIGTERM  # another process got it
        if self.is_main:
            print(f"{signal.Signals(signum).name}: stopped after outer step {self.step}/{self.config.outer_steps}; "
                  f"checkpoint {path}\nresume with: {resume_command(distributed=self.world_size > 1)}",
                  file=sys.stderr, flush=True)
        raise MetaTrainingInterrupted(signum, self.step, path)


def _tracker_hparams(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat ``section.key`` → scalar (TensorBoard's hparams take only int/float/str/bool)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_tracker_hparams(value, name + "."))
        elif value is None or isinstance(value, (list, tuple)):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat
