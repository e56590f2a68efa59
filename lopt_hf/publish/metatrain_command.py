"""The ``metatrain`` command (``scripts/metatrain.py``, ``lopt-hf metatrain``): meta-train, then export.

:func:`train_and_export` runs :class:`~lopt_hf.metatrain.trainer.MetaTrainer` and exports its final
checkpoint to ``<run>/final`` (config.json, model.safetensors, the evaluated model card, plots),
optionally pushing it to the Hub; :func:`main` is the command line around it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `--help` must not pay for torch, accelerate and transformers
    from ..metatrain.config import MetaTrainConfig
    from ..metatrain.trainer import MetaTrainer, TrainResult

__all__ = ["train_and_export", "main", "build_parser", "parse_args"]


def train_and_export(config: MetaTrainConfig, *, resume: bool | str | os.PathLike[str] = False,
                     progress: bool = True, export: bool = True, trainer: MetaTrainer | None = None) -> TrainResult:
    """Meta-train ``config`` (every process), then export the final checkpoint to ``<run>/final`` (main process).

    The export evaluates for the card when ``evaluation.steps > 0`` and pushes to ``config.push_to_hub``
    when it is set. ``trainer``: an already built trainer for ``config`` (default: a new one with
    ``resume`` and ``progress``). Returns the training result with ``artifact_dir`` set where exported.
    """
    from ..metatrain.checkpoint import latest_checkpoint
    from ..metatrain.trainer import MetaTrainer
    from .export import export_checkpoint

    if trainer is None:
        trainer = MetaTrainer(config, resume=resume, progress=progress)
    result = trainer.train()
    if not (export and trainer.is_main):
        return result
    artifact_dir = result.run_dir / "final"
    checkpoint = latest_checkpoint(trainer.checkpoint_root)
    assert checkpoint is not None
    export_checkpoint(checkpoint, artifact_dir, push_to_hub=config.push_to_hub, progress=trainer.progress)
    print(f"exported the learned optimizer to {artifact_dir}"
          + (f" and pushed it to {config.push_to_hub}" if config.push_to_hub else ""), file=sys.stderr)
    return dataclasses.replace(result, artifact_dir=artifact_dir)


def check_push_target(repo_id: str | None) -> None:
    """A ``ConfigError`` before training when ``push_to_hub`` is not a valid repo id or the Hub is switched off."""
    if not repo_id:
        return
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from ..metatrain.config import ConfigError

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        first_line = (str(err).strip().splitlines() or ["invalid"])[0]
        raise ConfigError(f"push_to_hub: not a valid Hub repo id: {first_line}") from None
    if constants.HF_HUB_OFFLINE:
        raise ConfigError("push_to_hub needs the Hub, but HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE (or "
                          "TRANSFORMERS_OFFLINE) and try again")


def start_line(config: MetaTrainConfig, source: os.PathLike[str] | None, step: int, processes: int) -> str:
    """What is about to run, printed before the first outer step: config, length, estimator, run folder."""
    origin = f"config {source}" if source is not None else "built-in defaults"
    resumed = f", resuming at step {step}" if step else ""
    return (f"meta-training {config.name!r} ({origin}): rule {config.rule.name}, {config.outer_steps} outer steps of "
            f"{config.estimator.name} with {config.estimator.num_tasks} task slot(s) on {processes} process(es)"
            f"{resumed}; run folder {config.run_dir}")


# =============================================================================== command


EPILOG = """\
examples:
  lopt-hf metatrain --list-configs                                  # the configs shipped with lopt_hf
  lopt-hf metatrain --config quickstart                             # a shipped config, by name
  lopt-hf metatrain --config my_config.yaml                         # or any YAML file
  accelerate launch -m lopt_hf.metatrain --config quickstart        # the same, with Accelerate
  accelerate launch --num_processes 2 -m lopt_hf.metatrain --config small_fc_pes \\
      --set estimator.num_tasks=16 --meta_optimizer.lr 1e-3
  lopt-hf metatrain --config quickstart --resume                    # after a crash
  lopt-hf metatrain --config quickstart --push-to-hub you/quickstart-lopt
  lopt-hf metatrain --config quickstart --print-config              # resolved config (save it, edit it)

--config takes a YAML path or the name of a config shipped inside the package (its file stem under
lopt_hf/configs/, e.g. quickstart, celo, pretrained/small_fc_lolo); in a checkout, configs/ links to
the same files. `python -m lopt_hf.metatrain` and `scripts/metatrain.py` are this command too.

overrides: any config key, dotted: `--set SECTION.KEY=VALUE` (repeatable) or `--SECTION.KEY VALUE`;
values are YAML (`--set task.hidden_sizes=[64,32]`, `--set meta_optimizer.grad_clip=null`).
Unknown keys are errors naming the key.

a run folder (output_dir, default runs/<name>) holds: config.yaml (resolved config),
checkpoints/step-XXXXXXXX/ (newest keep_checkpoints kept), logs/ (TensorBoard), meta_loss.png,
metrics.csv, and final/ (the exported artifact: config.json, model.safetensors, README.md, plots).
"""


def build_parser(prog: str = "metatrain.py") -> argparse.ArgumentParser:
    """The argument parser of ``scripts/metatrain.py`` / ``lopt-hf metatrain``."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Meta-train a learned optimizer (lopt_hf) with Accelerate: tasks are split across the "
                    "launched processes, meta-gradients all-reduced, theta updated with AdamW; progress bar, "
                    "TensorBoard logs, atomic checkpoints, and the final artifact with its model card.")
    parser.add_argument("--config", metavar="NAME|YAML",
                        help="meta-training config: the name of a shipped one (`--list-configs`) or a YAML file; "
                             "default: built-in defaults")
    parser.add_argument("--list-configs", action="store_true",
                        help="list the configs shipped with lopt_hf (names for --config) and exit")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue the run from its newest checkpoint (or from the given checkpoint folder); "
                             "starts fresh if the run has none")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="publish the final artifact to this Hub repo "
                                                                 "(sets push_to_hub)")
    parser.add_argument("--output-dir", metavar="DIR", help="run folder (sets output_dir; default runs/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set estimator.num_tasks=8 (repeatable)")
    parser.add_argument("--steps", type=int, metavar="N", help="shorthand for --set outer_steps=N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-export", action="store_true", help="skip exporting <run>/final at the end")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return parser


def parse_args(argv: Sequence[str] | None = None,
               prog: str = "metatrain.py") -> tuple[argparse.Namespace, MetaTrainConfig]:
    """Parse the command line into the options and the resolved config."""
    parser = build_parser(prog)
    args, rest = parser.parse_known_args(argv)
    if args.list_configs:
        from .shipped_configs import describe_shipped_configs

        print(describe_shipped_configs())
        parser.exit()
    from ..metatrain.config import ConfigError, load_config
    from .card_evaluation import check_evaluation_tasks
    from .shipped_configs import resolve_config

    overrides = list(args.overrides)
    index = 0
    while index < len(rest):
        item = rest[index]
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            parser.error(f"unrecognized argument {item!r} (config overrides look like --set section.key=value "
                         f"or --section.key value)")
        if "=" in item:
            overrides.append(item[2:])
            index += 1
        elif index + 1 < len(rest):
            overrides.append(f"{item[2:]}={rest[index + 1]}")
            index += 2
        else:
            parser.error(f"{item} needs a value")
    if args.steps is not None:
        overrides.append(f"outer_steps={args.steps}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.push_to_hub:
        overrides.append(f"push_to_hub={args.push_to_hub}")
    try:
        args.config_path = None if args.config is None else resolve_config(args.config)
        config = load_config(args.config_path, overrides)
        check_evaluation_tasks(config, source=args.config or "command line")
    except ConfigError as err:
        parser.error(str(err))
    return args, config


def main(argv: Sequence[str] | None = None, prog: str = "metatrain.py") -> int:
    """Entry point of ``lopt-hf metatrain``, ``python -m lopt_hf.metatrain`` and ``scripts/metatrain.py``."""
    args, config = parse_args(argv, prog)
    from ..metatrain.checkpoint import CheckpointError
    from ..metatrain.config import ConfigError, config_to_dict
    from ..metatrain.trainer import MetaTrainer

    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    try:
        check_push_target(config.push_to_hub)  # now, not after hours of training
        trainer = MetaTrainer(config, resume=args.resume, progress=not args.no_progress)
        if trainer.is_main:
            print(start_line(config, args.config_path, trainer.step, trainer.accelerator.num_processes),
                  file=sys.stderr)
        result = train_and_export(config, export=not args.no_export, trainer=trainer)
    except (CheckpointError, ConfigError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    if trainer.is_main:
        losses = result.meta_losses
        window = max(1, min(10, len(losses) // 5 or 1))
        print(f"done: {result.final_step} outer steps in {result.elapsed_s:.1f} s; meta-loss "
              f"{sum(losses[:window]) / window:.4f} → {sum(losses[-window:]) / window:.4f} "
              f"(mean of first/last {window}); run folder {result.run_dir}", file=sys.stderr)
    return 0
