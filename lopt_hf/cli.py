"""The ``lopt-hf`` command line.

Commands: ``bench``, ``card``, ``convert``, ``create``, ``eval``, ``export``, ``metatrain``, ``pretrained``, ``push``,
``rules``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import format_results, run_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(width) for width in args.layers.split(",")]
    results = run_benchmark(args.rules or None, layers=layers, device=args.device, warmup=args.warmup,
                            repeats=args.repeats, measure_memory=not args.no_memory)
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


def _cmd_create(args: argparse.Namespace) -> int:
    from .hub import create_artifact

    rule_config = json.loads(args.rule_config) if args.rule_config else None
    artifact = create_artifact(args.rule, seed=args.seed, rule_config=rule_config,
                               provenance={"source": f"lopt-hf create {args.rule} --seed {args.seed} (random init)"})
    artifact.save_pretrained(args.out_dir)
    print(f"wrote {args.rule} artifact (random init, seed {args.seed}) to {args.out_dir}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .publish.push import push_artifact_folder

    # Validates before anything is uploaded; also uploads the images the card shows (meta-loss plot).
    url = push_artifact_folder(args.directory, args.repo_id, private=args.private, revision=args.revision,
                               commit_message=args.message)
    print(f"pushed {args.directory} to {args.repo_id}: {url}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .metatrain.checkpoint import CheckpointError, latest_checkpoint
    from .publish.export import export_checkpoint

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "trainer_state.json").is_file():
        # A run folder (or its checkpoints/ folder): take the newest complete checkpoint.
        found = latest_checkpoint(checkpoint / "checkpoints") or latest_checkpoint(checkpoint)
        if found is None:
            print(f"lopt-hf export: {checkpoint} is neither a checkpoint (no trainer_state.json) nor a run folder "
                  f"with checkpoints/step-*", file=sys.stderr)
            return 2
        checkpoint = found
    try:
        artifact = export_checkpoint(checkpoint, args.out_dir, evaluate=args.evaluate, push_to_hub=args.push_to_hub,
                                     progress=True)
    except CheckpointError as err:
        print(f"lopt-hf export: {err}", file=sys.stderr)
        return 2
    print(f"exported {checkpoint} (rule {artifact.config.rule}) to {args.out_dir}: "
          f"{sorted(p.name for p in Path(args.out_dir).iterdir())}")
    if args.push_to_hub:
        print(f"pushed to {args.push_to_hub}")
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .hub import load_artifact, write_file_atomic

    artifact = load_artifact(args.directory)
    card = str(artifact.model_card(repo_id=args.repo_id))
    if args.stdout:
        print(card)
    else:
        target = Path(args.directory) / "README.md"
        write_file_atomic(target, card.encode("utf-8"))  # replaces a link at README.md, never writes through it
        print(f"wrote {target}")
    return 0


def _cmd_metatrain(args: argparse.Namespace) -> int:
    from .publish.metatrain_command import main as metatrain_main

    return metatrain_main(args.metatrain_args, prog="lopt-hf metatrain")


def _cmd_convert(args: argparse.Namespace) -> int:
    from .artifact_validation import ArtifactError
    from .convert.celo2 import convert_celo2

    try:
        artifact = convert_celo2(args.checkpoint, args.out_dir, variant=args.variant)
    except ArtifactError as err:
        print(f"lopt-hf convert: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.variant} artifact (rule {artifact.config.rule}, harness "
          f"{json.dumps(artifact.config.harness)}) converted from {args.checkpoint} to {args.out_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import (DatasetUnavailableError, OptimizerSpecError, UnknownTaskError, markdown_table,
                             run_evaluation, write_report)

    try:
        results = run_evaluation(args.tasks, args.optimizers, steps=args.steps, seeds=args.seeds,
                                 progress=not args.no_progress, threads=args.threads or None)
    except (DatasetUnavailableError, OptimizerSpecError, UnknownTaskError, ValueError) as err:
        print(f"lopt-hf eval: {err}", file=sys.stderr)
        return 2
    paths = write_report(results, args.out)
    print(markdown_table(results))
    for task, reason in results["settings"]["skipped_tasks"].items():
        print(f"skipped {task}: {reason}")
    print(f"{results['settings']['total_seconds']:.0f} s; wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lopt-hf``."""
    parser = argparse.ArgumentParser(prog="lopt-hf", description="Learned optimizers for PyTorch on the Hub.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="step time and memory of each rule vs torch.optim.AdamW")
    bench.add_argument("--rules", nargs="*", help="rules or presets (celo2, celo2-base) to time (default: all)")
    bench.add_argument("--layers", default="512,1024,1024,10", help="MLP widths (default 512,1024,1024,10)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--repeats", type=int, default=10)
    bench.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    bench.add_argument("--json", help="also write the results to this JSON file")
    bench.set_defaults(func=_cmd_bench)

    rules = sub.add_parser("rules", help="list the registered update rules and their hyper-parameters")
    rules.set_defaults(func=_cmd_rules)

    pretrained = sub.add_parser("pretrained", help="list the learned optimizers shipped with lopt_hf "
                                                   "(load_lopt(NAME, model) loads them offline)")
    pretrained.set_defaults(func=_cmd_pretrained)

    create = sub.add_parser("create", help="write a randomly initialised artifact for a rule")
    create.add_argument("rule")
    create.add_argument("out_dir")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--rule-config", help="JSON object of rule hyper-parameters")
    create.set_defaults(func=_cmd_create)

    convert = sub.add_parser("convert", help="convert another library's learned-optimizer checkpoint to an artifact")
    convert.add_argument("format", choices=["celo2"], help="checkpoint format (celo2: the authors' flax theta.state)")
    convert.add_argument("checkpoint", help="path of the checkpoint file (e.g. celo2/theta.state)")
    convert.add_argument("out_dir", help="artifact folder to write (config.json, model.safetensors, README.md)")
    convert.add_argument("--variant", choices=["celo2", "celo2-base"], default="celo2",
                         help="celo2: orthogonalisation + AdamW for 1-D/embeddings; celo2-base: learned rule only")
    convert.set_defaults(func=_cmd_convert)

    metatrain = sub.add_parser("metatrain", add_help=False,
                               help="meta-train a learned optimizer (same options as scripts/metatrain.py; "
                                    "`lopt-hf metatrain --help`)")
    metatrain.add_argument("metatrain_args", nargs=argparse.REMAINDER)
    metatrain.set_defaults(func=_cmd_metatrain)

    evaluate = sub.add_parser("eval", help="train small tasks with baselines and learned optimizers; write curves "
                                           "(JSON, plot) and a markdown table")
    evaluate.add_argument("--optimizers", nargs="+", default=None, metavar="SPEC",
                          help="adamw, adamw:LR, adamw-grid, adam[:LR], sgdm[:LR], or a learned-optimizer folder / "
                               "Hub repo id; LABEL=SPEC names one (default: adamw adamw-grid adam sgdm)")
    evaluate.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                          help="digits_mlp, digits_cnn, fashion_mnist_mlp, fashion_mnist_mlp16, mnist_mlp, tiny_lm "
                               "(default: all whose data is available here)")
    evaluate.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    evaluate.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="one run per seed (default 0 1)")
    evaluate.add_argument("--out", default="eval_out", help="folder for results.json, curves.png, results.md "
                                                            "(default eval_out)")
    evaluate.add_argument("--threads", type=int, default=1,
                          help="torch threads (default 1, the fastest for these tiny models; 0 = torch's choice)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_cmd_eval)

    export = sub.add_parser("export", help="write the artifact folder (config.json, model.safetensors, model card, "
                                           "meta-loss plot) of a meta-training checkpoint")
    export.add_argument("checkpoint", help="a checkpoint folder (runs/NAME/checkpoints/step-…) or a run folder "
                                           "(its newest checkpoint)")
    export.add_argument("out_dir", help="artifact folder to write")
    export.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=None,
                        help="run the config's evaluation (the lopt-hf eval harness) for the model card (default: "
                             "if the run's config has evaluation.steps > 0)")
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="also publish the artifact to this Hub repo")
    export.set_defaults(func=_cmd_export)

    card = sub.add_parser("card", help="re-render the model card (README.md) of an artifact folder from its "
                                       "config.json")
    card.add_argument("directory")
    card.add_argument("--repo-id", help="Hub repo the usage snippets should name")
    card.add_argument("--stdout", action="store_true", help="print the card instead of writing README.md")
    card.set_defaults(func=_cmd_card)

    push = sub.add_parser("push", help="validate an artifact folder and push it (and the images its card shows) "
                                       "to the Hub")
    push.add_argument("directory")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="branch to push to")
    push.add_argument("--message", default="Upload learned optimizer with lopt_hf")
    push.set_defaults(func=_cmd_push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lopt-hf`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["metatrain"]:  # everything after it belongs to the meta-training parser (incl. --help)
        from .publish.metatrain_command import main as metatrain_main

        return metatrain_main(argv[1:], prog="lopt-hf metatrain")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
