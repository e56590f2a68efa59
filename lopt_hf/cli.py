"""The ``lopt-hf`` command line.

Commands: ``bench``, ``card``, ``convert``, ``create``, ``eval``, ``export``, ``metatrain``, ``pretrained``, ``push``,
``rules``.

Expected failures (a missing folder, a bad repo id or JSON, no network, HF_HUB_OFFLINE without a cached
copy, a refused token, an invalid artifact, ...) end in one line on stderr, ``lopt-hf COMMAND: what
went wrong and what to do``, and exit code 2; ``--debug`` shows the traceback instead. Anything else
is a bug and keeps its traceback. Output cut short by its reader (``lopt-hf rules | head -3``) ends
quietly with exit code 141, like a Unix tool stopped by SIGPIPE.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2
# 128 + SIGPIPE: what the shell reports for a tool whose output pipe was closed (`| head`).
EXIT_STDOUT_CLOSED = 141
LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN to a token with access to the repo"
OFFLINE_HINT = ("check the network (and HF_ENDPOINT / the proxy settings); with HF_HUB_OFFLINE=1 only copies already "
                "in the local Hub cache are used")


class VersionAction(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked (``--help`` stays fast)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the lopt_hf version and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("lopt_hf")
        except PackageNotFoundError:
            installed = "unknown (not installed; running from a source tree)"
        print(f"{parser.prog} {installed}")
        parser.exit()


class CommandError(Exception):
    """An expected failure of a command: shown as one line, ``lopt-hf COMMAND: message``, exit code 2."""


# ============================================================================ checks before any work


def looks_like_local_path(text: str) -> bool:
    """Whether an argument names a local path rather than a Hub repo id (such a path is never sent to the Hub).

    True when it exists, starts with ``.``, ``~`` or a separator, or has a separator a repo id cannot
    have (a backslash, or more than one ``/``).
    """
    separators = {os.sep, os.altsep or os.sep} - {"/"}
    return (os.path.exists(text) or text.startswith((".", "~", "/")) or text.count("/") > 1
            or any(sep in text for sep in separators))


ARTIFACT_FOLDER = "artifact folder (a local folder with config.json and model.safetensors, e.g. the out_dir of " \
                  "`lopt-hf create` or `lopt-hf export`)"


def existing_folder(path: str, what: str = ARTIFACT_FOLDER) -> str:
    """``path`` if it is a local folder; a :class:`CommandError` saying what is wrong otherwise.

    The message lists the folders next to it when its parent exists (a mistyped run or step name).
    """
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise CommandError(f"{path} is a file, not a folder; expected the {what}")
    parent = os.path.dirname(os.path.normpath(expanded))
    nearby = ""
    if parent and os.path.isdir(parent):
        names = sorted(entry.name for entry in os.scandir(parent) if entry.is_dir())
        shown = ", ".join(names[-8:]) if names else "no folders"
        nearby = f"; {parent} has: {'..., ' if len(names) > 8 else ''}{shown}"
    raise CommandError(f"folder {path} does not exist{nearby}; expected the {what}")


def checked_repo_id(repo_id: str) -> str:
    """``repo_id`` if huggingface_hub's validator accepts it (checked before any network call)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        reason = one_line(err).split(". Use `repo_type`")[0]
        raise CommandError(f"{repo_id!r} is not a valid Hub repo id ({reason}); expected 'owner/name' of letters, "
                           f"digits, '-', '_', '.'") from None
    return repo_id


def require_online(action: str) -> None:
    """A :class:`CommandError` at once when HF_HUB_OFFLINE is set and ``action`` needs the Hub."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise CommandError(f"{action} needs the Hub, but HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE (or "
                           f"TRANSFORMERS_OFFLINE) and try again")


def check_hub_artifacts(repo_ids: Iterable[str]) -> None:
    """Fail fast for Hub artifacts that cannot be had, before any training: load each one now.

    The load is the one mechanism (:func:`lopt_hf.hub.load_artifact`): it uses the cache, fails at once
    when the Hub is unreachable and nothing is cached, and names the problem; what it fetches is cached
    for the evaluation that follows.
    """
    from .hub import ArtifactError, load_artifact

    for repo_id in repo_ids:
        checked_repo_id(repo_id)
        try:
            load_artifact(repo_id)
        except ArtifactError as err:
            raise CommandError(str(err)) from None


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (its class name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def describe_error(err: BaseException) -> str | None:
    """The one-line message for an expected failure, or ``None`` for anything else (a bug: traceback)."""
    if isinstance(err, CommandError):
        return str(err)
    hub_errors = sys.modules.get("huggingface_hub.errors")
    if hub_errors is not None:
        if isinstance(err, hub_errors.OfflineModeIsEnabled):
            return f"{one_line(err)} (this needs the Hub; or use a local folder)"
        if isinstance(err, hub_errors.HFValidationError):
            return f"not a valid Hub repo id: {one_line(err)}"
        if isinstance(err, hub_errors.HfHubHTTPError):
            return describe_http_error(err, hub_errors)
    from .loader_options import network_error_types

    if isinstance(err, network_error_types()):
        from huggingface_hub import constants

        return f"could not reach the Hub at {constants.ENDPOINT} ({one_line(err)}): {OFFLINE_HINT}"
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.strerror or one_line(err)}: {err.filename}"
    if isinstance(err, (ValueError, RuntimeError, LookupError)) and type(err).__module__.startswith("lopt_hf."):
        return one_line(err)  # the package's own errors: ArtifactError, RuleConfigError, CheckpointError, ...
    return None


def describe_http_error(err: Any, hub_errors: Any) -> str:
    """One line for an error answer of the Hub, with the login hint where a token is the problem."""
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    detail = getattr(err, "server_message", None) or one_line(err)
    detail = " ".join(detail.split())
    if isinstance(err, hub_errors.RepositoryNotFoundError):
        return f"Hub repo not found, or private/gated and your token cannot see it ({detail}): {LOGIN_HINT}"
    if status in (401, 403):
        from huggingface_hub import get_token

        token = "no token is set" if get_token() is None else "your token was refused"
        return f"the Hub answered {status} ({detail}); {token}: {LOGIN_HINT} (write access to push)"
    if isinstance(status, int) and status >= 500:
        return f"the Hub answered {status} ({detail}): try again later"
    return f"the Hub answered {status} ({detail})"


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import format_results, run_benchmark

    from .bench import benchmark_names

    unknown = [name for name in args.rules or [] if name not in benchmark_names()]
    if unknown:
        raise CommandError(f"unknown rule(s) {unknown}{suggestion(unknown[0], benchmark_names())}; choose from "
                           f"{benchmark_names()} (`lopt-hf rules` lists them)")
    try:
        layers = [int(width) for width in args.layers.split(",")]
    except ValueError:
        raise CommandError(f"--layers {args.layers!r}: expected comma-separated integer widths, "
                           f"e.g. 512,1024,10") from None
    if len(layers) < 2 or min(layers) < 1:
        raise CommandError(f"--layers {args.layers!r}: expected at least two positive widths, e.g. 512,1024,10")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile and args.warmup < 1:
        raise CommandError("--compile needs --warmup >= 1: the first step of a compiled rule compiles it")
    results = run_benchmark(args.rules or None, layers=layers, device=args.device, warmup=args.warmup,
                            repeats=args.repeats, measure_memory=not args.no_memory, compile=args.compile)
    print(format_results(results, layers, args.device))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([vars(r) for r in results], out, indent=2)
    return 0


def _cmd_rules(args: argparse.Namespace) -> int:
    from .rules import available_rules, build_rule

    for name in available_rules():
        rule = build_rule(name)
        num = sum(math.prod(shape) for shape in rule.theta_shapes().values())
        print(f"{name:<16} {num:>7} meta-parameters  {json.dumps(rule.hyperparameters())}")
    return 0


def _cmd_pretrained(args: argparse.Namespace) -> int:
    from .pretrained import available_pretrained, pretrained_path

    for name, summary in available_pretrained().items():
        print(f"{name:<26} {summary}\n{'':<26} {pretrained_path(name)}")
    return 0


def suggestion(name: str, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for a close match of ``name`` among ``choices``, else ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def json_object(text: str | None, option: str) -> dict[str, Any] | None:
    """The JSON object an option holds (``None`` if not given); a one-line :class:`CommandError` otherwise."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CommandError(f"{option} {text!r} is not JSON ({err.msg} at character {err.pos}); expected an object, "
                           f"e.g. {option} '{{\"hidden_size\": 16}}'") from None
    if not isinstance(value, dict):
        raise CommandError(f"{option} {text!r} is a JSON {type(value).__name__}; expected an object, e.g. "
                           f"{option} '{{\"hidden_size\": 16}}'")
    return value


def writable_out_dir(path: str, force: bool) -> None:
    """Refuse a file, or a non-empty folder unless ``force``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CommandError(f"{path} exists and is a file; choose a folder path")
    if os.path.isdir(path) and any(os.scandir(path)) and not force:
        raise CommandError(f"{path} exists and is not empty; choose another folder, or pass --force to write the "
                           f"artifact files (config.json, model.safetensors, README.md) into it")


def _cmd_create(args: argparse.Namespace) -> int:
    from .harness import RULE_PRESETS
    from .rules import available_rules

    rule_config = json_object(args.rule_config, "--rule-config")
    choices = [*available_rules(), *[name for name in RULE_PRESETS if name not in available_rules()]]
    if args.rule not in choices:
        raise CommandError(f"unknown rule {args.rule!r}{suggestion(args.rule, choices)}; choose from {choices} "
                           f"(`lopt-hf rules` lists them)")
    writable_out_dir(args.out_dir, args.force)
    from .hub import create_artifact

    rule, harness, defaults = args.rule, None, None
    if args.rule in RULE_PRESETS:  # as in `lopt-hf bench`: a preset replaces the rule of the same name
        from .convert.celo2 import OPTIMIZER_DEFAULTS

        rule, preset_config, harness = RULE_PRESETS[args.rule]
        rule_config = {**preset_config, **(rule_config or {})}
        defaults = dict(OPTIMIZER_DEFAULTS)
    provenance = {"name": f"{args.rule} (untrained random initialisation, seed {args.seed})", "untrained": True,
                  "tags": ["untrained", "random-init"],
                  "source": f"lopt-hf create {args.rule} --seed {args.seed} (random init)"}
    artifact = create_artifact(rule, seed=args.seed, rule_config=rule_config, harness=harness,
                               optimizer_defaults=defaults, provenance=provenance)
    artifact.save_pretrained(args.out_dir)
    print(f"wrote {args.rule} artifact (untrained random initialisation, seed {args.seed}: a starting point for "
          f"meta-training, not a usable optimizer) to {args.out_dir}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    directory = existing_folder(args.directory)
    checked_repo_id(args.repo_id)
    require_online("pushing")
    from .publish.push import push_artifact_folder

    # Validates before anything is uploaded; also uploads the images the card shows (meta-loss plot).
    url = push_artifact_folder(directory, args.repo_id, private=args.private, revision=args.revision,
                               commit_message=args.message)
    print(f"pushed {args.directory} to {args.repo_id}: {url}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:

    from .metatrain.checkpoint import CheckpointError, list_checkpoints, newest_intact_checkpoint
    from .publish.export import export_checkpoint

    checkpoint = Path(existing_folder(args.checkpoint,
                                      "checkpoint folder (runs/NAME/checkpoints/step-…) or run folder"))
    if args.push_to_hub:
        checked_repo_id(args.push_to_hub)
        require_online("--push-to-hub")
    if args.base_model:
        checked_repo_id(args.base_model)
    if not (checkpoint / "trainer_state.json").is_file():
        # A run folder (or its checkpoints/ folder): the newest checkpoint that verifies; damaged newer ones are
        # named and skipped (left where they are: exporting never changes the run folder).
        root = checkpoint / "checkpoints" if list_checkpoints(checkpoint / "checkpoints") else checkpoint
        if not list_checkpoints(root):
            print(f"lopt-hf export: {checkpoint} is neither a checkpoint (no trainer_state.json) nor a run folder "
                  f"with checkpoints/step-*", file=sys.stderr)
            return 2
        found, damaged = newest_intact_checkpoint(root)
        for _, reason in damaged:
            print(f"lopt-hf export: skipping a damaged checkpoint: {reason}", file=sys.stderr)
        if found is None:
            print(f"lopt-hf export: every checkpoint under {root} is damaged (see above); nothing to export",
                  file=sys.stderr)
            return 2
        checkpoint = found
    try:
        artifact = export_checkpoint(checkpoint, args.out_dir, evaluate=args.evaluate, progress=True,
                                     license=args.license, base_model=args.base_model)
    except CheckpointError as err:
        print(f"lopt-hf export: {err}", file=sys.stderr)
        return 2
    if args.push_to_hub:  # after the export (as export_checkpoint(push_to_hub=) does), so a failure keeps the folder
        from .publish.push import push_artifact_folder

        try:
            push_artifact_folder(args.out_dir, args.push_to_hub)
        except Exception as err:
            message = describe_error(err)
            if message is None:
                raise
            raise CommandError(f"exported to {args.out_dir}, but the push failed: {message} (then: lopt-hf push "
                               f"{args.out_dir} {args.push_to_hub})") from err
    print(f"exported {checkpoint} (rule {artifact.config.rule}) to {args.out_dir}: "
          f"{sorted(p.name for p in Path(args.out_dir).iterdir())}")
    if args.push_to_hub:
        print(f"pushed to {args.push_to_hub}")
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    directory = existing_folder(args.directory)
    from .hub import load_artifact, write_file_atomic

    artifact = load_artifact(directory)
    card = str(artifact.model_card(repo_id=args.repo_id))
    if args.stdout:
        print(card)
    else:
        target = Path(directory) / "README.md"
        write_file_atomic(target, card.encode("utf-8"))  # replaces a link at README.md, never writes through it
        print(f"wrote {target}")
    return 0


def _cmd_metatrain(args: argparse.Namespace) -> int:
    from .publish.metatrain_command import main as metatrain_main

    return metatrain_main(args.metatrain_args, prog="lopt-hf metatrain")


def _cmd_convert(args: argparse.Namespace) -> int:
    from .artifact_validation import ArtifactError
    from .convert.foreign import convert_checkpoint

    if args.variant is not None and args.format != "celo2":
        raise CommandError(f"--variant only applies to `lopt-hf convert celo2`, not to {args.format}")
    if args.ff_mult is not None and args.format != "velo":
        raise CommandError(f"--ff-mult only applies to `lopt-hf convert velo`, not to {args.format}")
    if args.ff_mult is not None and not (math.isfinite(args.ff_mult) and args.ff_mult > 0):
        raise CommandError(f"--ff-mult must be a positive number, got {args.ff_mult}")
    variant = (args.variant or "celo2") if args.format == "celo2" else None
    try:
        artifact = convert_checkpoint(args.format, args.checkpoint, args.out_dir, variant=variant,
                                      ff_mult=args.ff_mult, force=args.force)
    except ArtifactError as err:
        print(f"lopt-hf convert: {err}", file=sys.stderr)
        return 2
    print(f"wrote {variant or args.format} artifact (rule {artifact.config.rule}, rule_config "
          f"{json.dumps(artifact.config.rule_config)}, harness {json.dumps(artifact.config.harness)}) converted "
          f"from {args.checkpoint} to {args.out_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import (HELDOUT_TASKS, VALIDATION_TASKS, DatasetUnavailableError, OptimizerSpecError,
                             UnknownTaskError, markdown_table, run_evaluation, write_report)

    tasks, runs = args.tasks, [(args.steps, Path(args.out))]
    if args.suite and args.tasks:
        print(f"lopt-hf eval: --suite {args.suite} chooses the tasks; drop --tasks", file=sys.stderr)
        return 2
    if args.suite == "heldout":  # the held-out tasks at --steps and at 10× (issue 15's harder evaluation)
        tasks = list(HELDOUT_TASKS)
        runs = [(steps, Path(args.out) / f"steps{steps}") for steps in (args.steps, 10 * args.steps)]
    elif args.suite == "validation":  # the meta-training families, for choosing checkpoints
        tasks = list(VALIDATION_TASKS)
    for steps, out in runs:
        try:
            check_learned_sources(args.optimizers or [])
            results = run_evaluation(tasks, args.optimizers, steps=steps, seeds=args.seeds,
                                     progress=not args.no_progress, threads=args.threads or None)
        except (DatasetUnavailableError, OptimizerSpecError, UnknownTaskError, ValueError) as err:
            print(f"lopt-hf eval: {err}", file=sys.stderr)
            return 2
        paths = write_report(results, out)
        print(markdown_table(results))
        for task, reason in results["settings"]["skipped_tasks"].items():
            print(f"skipped {task}: {reason}")
        print(f"{results['settings']['total_seconds']:.0f} s; wrote "
              + ", ".join(str(path) for path in paths.values()))
    return 0


def check_learned_sources(specs: Sequence[str]) -> None:
    """Before any training: learned-optimizer folders exist, Hub ones can be had (:func:`check_hub_artifacts`)."""
    from .evaluation import parse_optimizer_spec
    from .evaluation.optimizers import LEARNED
    from .pretrained import pretrained_path

    hub_ids = []
    for spec in map(parse_optimizer_spec, specs):
        if spec.kind != LEARNED or spec.source is None or pretrained_path(spec.source) is not None:
            continue
        if looks_like_local_path(spec.source):
            existing_folder(spec.source, f"learned-optimizer folder of --optimizers {spec.spec}")
        else:
            hub_ids.append(spec.source)
    check_hub_artifacts(hub_ids)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lopt-hf``."""
    parser = argparse.ArgumentParser(prog="lopt-hf", description="Learned optimizers for PyTorch on the Hub.",
                                     epilog="Expected failures print one line and exit with code 2; --debug shows "
                                            "the traceback.")
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure instead of one line")
    # --debug also after the command (SUPPRESS: not given there keeps the top-level value)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of a failure instead of one line")
    sub = parser.add_subparsers(dest="command", required=True,
                                help="the command to run (`lopt-hf COMMAND --help` lists its options)")

    bench = sub.add_parser("bench", parents=[common], help="step time and memory of each rule vs torch.optim.AdamW")
    bench.add_argument("--rules", nargs="*", help="rules or presets (celo2, celo2-base) to time (default: all)")
    bench.add_argument("--layers", default="512,1024,1024,10", help="MLP widths (default 512,1024,1024,10)")
    bench.add_argument("--device", default="cpu", help="torch device to time on (default cpu; e.g. cuda)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    bench.add_argument("--repeats", type=int, default=10, help="timed steps; the median is reported (default 10)")
    bench.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    bench.add_argument("--compile", action="store_true",
                       help="also time, as NAME+compile, each rule that steps faster with compile=True (celo, velo, "
                            "celo_adam, ...; its first warm-up step compiles: seconds to minutes)")
    bench.add_argument("--json", help="also write the results to this JSON file")
    bench.set_defaults(func=_cmd_bench)

    rules = sub.add_parser("rules", parents=[common],
                           help="list the registered update rules and their hyper-parameters")
    rules.set_defaults(func=_cmd_rules)

    pretrained = sub.add_parser("pretrained", parents=[common],
                                help="list the learned optimizers shipped with lopt_hf "
                                     "(load_lopt(NAME, model) loads them offline)")
    pretrained.set_defaults(func=_cmd_pretrained)

    create = sub.add_parser("create", parents=[common],
                            help="write an untrained, randomly initialised artifact for a rule (a starting point "
                                 "for meta-training and a test fixture, not a usable optimizer)")
    create.add_argument("rule", help="rule name (`lopt-hf rules`) or preset: celo2 (with its AdamW harness), "
                                     "celo2-base")
    create.add_argument("out_dir", help="artifact folder to write (config.json, model.safetensors, README.md); "
                                        "must be new or empty unless --force")
    create.add_argument("--seed", type=int, default=0, help="seed of the random meta-parameters (default 0)")
    create.add_argument("--rule-config", help="JSON object of rule hyper-parameters, e.g. '{\"hidden_size\": 16}'")
    create.add_argument("--force", action="store_true", help="write into a non-empty out_dir (replaces the "
                                                             "artifact files there)")
    create.set_defaults(func=_cmd_create)

    convert = sub.add_parser("convert", parents=[common],
                             help="convert another library's learned-optimizer checkpoint to an artifact")
    convert.add_argument("format", choices=["celo2", "celo", "celo-adam", "velo"],
                         help="checkpoint format: the authors' flax theta.state of Celo2, Celo, Celo-Adam or VeLO "
                              "(sizes are read from the shapes; VeLO's ff_mult is 100 for the velo_4000 size, "
                              "1 otherwise)")
    convert.add_argument("checkpoint", help="path of the checkpoint file (e.g. celo2/theta.state)")
    convert.add_argument("out_dir", help="artifact folder to create (config.json, model.safetensors, README.md); "
                                         "must be new or empty unless --force")
    convert.add_argument("--force", action="store_true", help="replace the artifact files of a non-empty out_dir")
    convert.add_argument("--variant", choices=["celo2", "celo2-base"], default=None,
                         help="celo2 format only: celo2 (default): orthogonalisation + AdamW for 1-D/embeddings; "
                              "celo2-base: learned rule only")
    convert.add_argument("--ff-mult", type=float, default=None,
                         help="velo format only: factor on the mixed per-element network, which the checkpoint "
                              "does not store (default: 100 for the velo_4000 size, LSTM 512 and 256 networks; "
                              "1 otherwise, as velo_s)")
    convert.set_defaults(func=_cmd_convert)

    metatrain = sub.add_parser("metatrain", add_help=False,
                               help="meta-train a learned optimizer from a shipped config (`--config quickstart`; "
                                    "`--list-configs`) or a YAML file; `lopt-hf metatrain --help`")
    metatrain.add_argument("metatrain_args", nargs=argparse.REMAINDER,
                           help="options of the meta-training command (`lopt-hf metatrain --help`)")
    metatrain.set_defaults(func=_cmd_metatrain)

    evaluate = sub.add_parser("eval", parents=[common],
                              help="train small tasks with baselines and learned optimizers; write curves "
                                   "(JSON, plot) and a markdown table")
    evaluate.add_argument("--optimizers", nargs="+", default=None, metavar="SPEC",
                          help="adamw, adamw:LR, adamw-grid, adam[:LR], sgdm[:LR], or a learned optimizer (shipped name, "
                               "folder or Hub repo id); LABEL=SPEC names one (default: lopt-hf/celo-adam-ns lopt-hf/celo-adam-mix "
                               "lopt-hf/small-fc-lolo lopt-hf/celo2-base-mini adamw adamw-grid)")
    evaluate.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                          help="digits_mlp, digits_cnn, fashion_mnist_mlp, fashion_mnist_mlp16, mnist_mlp, "
                               "mnist_mlp_wide, fashion_mnist_cnn, tiny_lm (default: those whose data is available "
                               "here), fashion_mnist_mlp_wide, docs_lm (--suite validation)")
    evaluate.add_argument("--suite", choices=["heldout", "validation"], default=None,
                          help="heldout: mnist_mlp_wide, fashion_mnist_cnn and tiny_lm (unlike the 8×8-MLP "
                               "meta-training family) at --steps and at 10× --steps, reports in OUT/steps<N>; "
                               "validation: fashion_mnist_mlp_wide and docs_lm (the task mixtures' meta-training "
                               "families, new seeds) at --steps, to choose checkpoints without the heldout tasks")
    evaluate.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    evaluate.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="one run per seed (default 0 1)")
    evaluate.add_argument("--out", default="eval_out", help="folder for results.json, curves.png, results.md "
                                                            "(default eval_out)")
    evaluate.add_argument("--threads", type=int, default=1,
                          help="torch threads (default 1, the fastest for these tiny models; 0 = torch's choice)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_cmd_eval)

    export = sub.add_parser("export", parents=[common],
                            help="write the artifact folder (config.json, model.safetensors, model card, "
                                 "meta-loss plot) of a meta-training checkpoint")
    export.add_argument("checkpoint", help="a checkpoint folder (runs/NAME/checkpoints/step-…) or a run folder "
                                           "(its newest checkpoint)")
    export.add_argument("out_dir", help="artifact folder to write")
    export.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=None,
                        help="run the config's evaluation (the lopt-hf eval harness) for the model card (default: "
                             "if the run's config has evaluation.steps > 0)")
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="also publish the artifact to this Hub repo")
    export.add_argument("--license", metavar="ID", help="license of the exported weights in the card's metadata, a "
                                                        "Hub license id such as apache-2.0 or mit (default: the run "
                                                        "config's card.license)")
    export.add_argument("--base-model", metavar="REPO_ID",
                        help="Hub model these weights were fine-tuned from, for the card's base_model metadata "
                             "(default: card.base_model, or rule.init_from when it is a Hub repo id)")
    export.set_defaults(func=_cmd_export)

    card = sub.add_parser("card", parents=[common],
                          help="re-render the model card (README.md) of an artifact folder from its config.json")
    card.add_argument("directory", help="local artifact folder (config.json + model.safetensors)")
    card.add_argument("--repo-id", help="Hub repo the usage snippets should name")
    card.add_argument("--stdout", action="store_true", help="print the card instead of writing README.md")
    card.set_defaults(func=_cmd_card)

    push = sub.add_parser("push", parents=[common],
                          help="validate an artifact folder and push it (and the images its card shows) to the Hub "
                               "(log in first: `hf auth login` or HF_TOKEN)")
    push.add_argument("directory", help="local artifact folder to upload (config.json + model.safetensors)")
    push.add_argument("repo_id", help="Hub model repo, 'owner/name' (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private (if it does not exist yet)")
    push.add_argument("--revision", help="branch to push to (created if missing; default main)")
    push.add_argument("--message", default="Upload learned optimizer with lopt_hf", help="commit message")
    push.set_defaults(func=_cmd_push)
    return parser


def stdout_is_closed() -> bool:
    """Whether nothing reads this process's stdout any more (the reader of its pipe is gone, as after
    ``| head``) — so a ``BrokenPipeError`` is that, not a network connection that broke."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a file (a test's capture)
        return False
    import select

    if not hasattr(select, "poll"):  # Windows: no poll(); assume it was stdout, as Python's own recipe does
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def quit_on_closed_stdout() -> int:
    """End quietly after the reader of stdout went away: what is still buffered goes to ``os.devnull``
    (so the flush at exit cannot fail again); exit code :data:`EXIT_STDOUT_CLOSED`."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_STDOUT_CLOSED


def run_command(command: str, func: Any, debug: bool) -> int:
    """Run a command; an expected failure becomes one line on stderr and exit code 2 (unless ``debug``);
    a closed stdout (``| head``) ends it quietly (:func:`quit_on_closed_stdout`)."""
    try:
        code = func()
        if sys.stdout is not None:
            sys.stdout.flush()  # here, not at exit: a closed pipe is then handled below
        return code
    except Exception as err:
        if isinstance(err, BrokenPipeError) and stdout_is_closed():
            return quit_on_closed_stdout()
        message = None if debug else describe_error(err)
        if message is None:
            raise
        print(f"lopt-hf {command}: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lopt-hf`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    while argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    if argv[:1] == ["metatrain"]:  # everything after it belongs to the meta-training parser (incl. --help)
        def metatrain() -> int:
            from .publish.metatrain_command import main as metatrain_main

            return metatrain_main(argv[1:], prog="lopt-hf metatrain")

        return run_command("metatrain", metatrain, debug)
    args = build_parser().parse_args(argv)
    return run_command(args.command, lambda: args.func(args), debug or args.debug)


if __name__ == "__main__":
    sys.exit(main())
