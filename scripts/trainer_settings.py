"""Which transformers.Trainer settings suit a learned optimizer: LR schedule × warmup × gradient clipping, measured.

Trains the character-level GPT-2 of ``lopt-hf eval``'s ``tiny_lm`` task (``lopt_hf.evaluation.lm``: 2 layers × 64,
public-domain text, batch 16 × 64 characters) with ``transformers.Trainer`` for every optimizer, every
``lr_scheduler_type`` × warmup × ``max_grad_norm`` combination and every seed, from the same initialisation and
batches per seed. Learned optimizers get ``LearnedOptimizerCallback.attach`` (planned length; its settings
warning is off, the settings are the experiment) and their own lr; ``TrainingArguments.learning_rate`` is set to
the optimizer's lr, so the schedule multiplies exactly that.

Writes ``OUT/results.json`` (settings, per-run final training loss = mean of the last 10% of steps, held-out loss
and accuracy, seconds) and ``OUT/results.md`` (settings × optimizers, the best setting per optimizer in bold), and
prints the tables.

    nice python scripts/trainer_settings.py                      # the full grid (≈ 20 min on the busy 2-core machine)
    python scripts/trainer_settings.py --steps 3 --seeds 0 --optimizers adamw:1e-3 --schedules constant
    python scripts/trainer_settings.py --combine OUT1 OUT2 --out OUT   # several runs' seeds in one table
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_OPTIMIZERS = ("lopt-hf/small-fc-lolo", "lopt-hf/celo2-base-mini", "adamw:1e-3")
CELLS = ("Cells: training loss (mean of the last 10% of steps, nats/char; inf = diverged) ± half its spread over the "
         "seeds / held-out loss, means over the seeds.")


@dataclass(frozen=True)
class Setting:
    """One combination of the Trainer settings under test."""

    schedule: str  # TrainingArguments.lr_scheduler_type ("constant" with warmup: "constant_with_warmup")
    warmup: float  # TrainingArguments.warmup_steps: a fraction of the steps when < 1
    max_grad_norm: float  # 0 = no clipping

    @property
    def scheduler_type(self) -> str:
        """Trainer's ``"constant"`` ignores warmup; its warmed-up twin is ``"constant_with_warmup"``."""
        return "constant_with_warmup" if self.schedule == "constant" and self.warmup > 0 else self.schedule

    @property
    def label(self) -> str:
        warmup = ("no warmup" if self.warmup == 0 else f"{self.warmup:.0%} warmup" if self.warmup < 1
                  else f"{self.warmup:g} warmup steps")
        clip = "no clipping" if self.max_grad_norm == 0 else f"clip {self.max_grad_norm:g}"
        return f"{self.scheduler_type}, {warmup}, {clip}"


def run_one(spec: Any, setting: Setting, *, steps: int, seed: int, data: tuple) -> dict[str, float]:
    """Train one GPT-2 with one optimizer and setting; its final training loss, held-out loss and accuracy."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    from lopt_hf import LearnedOptimizerCallback, LearnedOptimizer
    from lopt_hf.evaluation.lm import (StopOnNonFiniteLoss, evaluate_char_lm, logged_losses, make_char_gpt2,
                                       trainer_arguments)
    from lopt_hf.evaluation.runner import final_window
    from lopt_hf.evaluation.tasks import TASKS

    task = TASKS["tiny_lm"]
    vocab_size, train_data, held_out = data
    start = time.perf_counter()
    model = make_char_gpt2(vocab_size, task.block_size, n_layer=task.n_layer, n_embd=task.n_embd,
                           n_head=task.n_head, seed=seed)
    (_, make_optimizer), = spec.candidates()
    optimizer = make_optimizer(model)
    with tempfile.TemporaryDirectory(prefix="lopt-hf-trainer-settings-") as output_dir:
        args = trainer_arguments(output_dir, steps=steps, batch_size=task.batch_size, seed=seed,
                                 learning_rate=float(optimizer.param_groups[0]["lr"]),
                                 lr_scheduler_type=setting.scheduler_type, warmup_steps=setting.warmup,
                                 max_grad_norm=setting.max_grad_norm)
        trainer = Trainer(model=model, args=args, train_dataset=train_data, optimizers=(optimizer, None))
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(StopOnNonFiniteLoss())
        if isinstance(optimizer, LearnedOptimizer):
            LearnedOptimizerCallback.attach(trainer, warn=False)
        trainer.train()
    losses = logged_losses(trainer)
    test_loss, accuracy = evaluate_char_lm(model, held_out)
    window = losses[-final_window(steps):]
    train_loss = sum(window) / len(window) if len(losses) == steps else math.inf  # stopped early: diverged
    return {"train_loss": train_loss, "test_loss": test_loss, "test_accuracy": accuracy,
            "seconds": time.perf_counter() - start}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per optimizer and setting label: the mean over seeds of each metric, and the training loss's spread."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["optimizer"], run["setting"]), []).append(run)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for (optimizer, setting), group in grouped.items():
        row = {key: statistics.fmean(run[key] for run in group) for key in ("train_loss", "test_loss", "test_accuracy")}
        train_losses = [run["train_loss"] for run in group]
        row["train_loss_spread"] = (max(train_losses) - min(train_losses)) / 2
        row["seeds"] = len(group)
        summary.setdefault(optimizer, {})[setting] = row
    return summary


def best_settings(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, str]:
    """Per optimizer, the setting label with the lowest mean final training loss."""
    return {optimizer: min(settings, key=lambda label: settings[label]["train_loss"])
            for optimizer, settings in summary.items()}


def markdown(summary: dict[str, dict[str, dict[str, float]]], header: str) -> str:
    """Settings × optimizers: mean training loss ± half its spread over seeds / held-out loss; best per column
    in bold."""
    optimizers = list(summary)
    labels = list(next(iter(summary.values())))
    best = best_settings(summary)
    lines = [header, "", "| settings | " + " | ".join(optimizers) + " |", "|---|" + "---:|" * len(optimizers)]
    for label in labels:
        cells = []
        for optimizer in optimizers:
            row = summary[optimizer][label]
            cell = f"{row['train_loss']:.3f} ±{row['train_loss_spread']:.3f} / {row['test_loss']:.3f}"
            cells.append(f"**{cell}**" if best[optimizer] == label else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Best per optimizer (lowest mean training loss):", ""]
    for optimizer, label in best.items():
        row = summary[optimizer][label]
        lines.append(f"- {optimizer}: {label} — train {row['train_loss']:.3f}, held-out {row['test_loss']:.3f}, "
                     f"accuracy {row['test_accuracy']:.3f}")
    return "\n".join(lines)


def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str, str]:
    """Run the grid of ``args``; the runs, the header of their report and the command that reproduces them."""
    from lopt_hf.evaluation import parse_optimizer_spec
    from lopt_hf.evaluation.lm import DEFAULT_TEXT, make_char_data
    from lopt_hf.evaluation.tasks import TASKS

    specs = [parse_optimizer_spec(spec) for spec in args.optimizers]
    settings = [Setting(*combo) for combo in itertools.product(args.schedules, args.warmups, args.clips)]
    data = make_char_data(DEFAULT_TEXT, TASKS["tiny_lm"].block_size)
    total, runs, start = len(specs) * len(settings) * len(args.seeds), [], time.perf_counter()
    for spec, setting, seed in itertools.product(specs, settings, args.seeds):
        result = run_one(spec, setting, steps=args.steps, seed=seed, data=data)
        runs.append({"optimizer": spec.label, "setting": setting.label, **asdict(setting), "seed": seed, **result})
        print(f"[{len(runs)}/{total}, {time.perf_counter() - start:.0f} s] {spec.label} | {setting.label} | seed "
              f"{seed}: train {result['train_loss']:.3f}, held-out {result['test_loss']:.3f}", flush=True)
    command = " ".join(["python scripts/trainer_settings.py", f"--steps {args.steps}",
                        "--seeds", *map(str, args.seeds), "--optimizers", *args.optimizers,
                        "--schedules", *args.schedules, "--warmups", *(f"{w:g}" for w in args.warmups),
                        "--clips", *(f"{c:g}" for c in args.clips)])
    threads = f"{args.threads} torch thread" + "s" * (args.threads > 1)
    header = (f"Trainer settings on the character-level GPT-2 of `tiny_lm` ({args.steps} steps, seeds "
              f"{', '.join(map(str, args.seeds))}). {CELLS} Command: `{command}` "
              f"({time.perf_counter() - start:.0f} s, {threads}).")
    return runs, header, command


def combine(folders: list[Path], out: Path) -> tuple[list[dict[str, Any]], str, str]:
    """The runs of several earlier reports (``results.json``), restricted to the (optimizer, settings) pairs
    measured in every one of them, the header of their joint report and the command that writes it."""
    reports = [json.loads((folder / "results.json").read_text()) for folder in folders]
    pairs = [{(run["optimizer"], run["setting"]) for run in report["runs"]} for report in reports]
    common = set.intersection(*pairs)
    runs = [run for report in reports for run in report["runs"] if (run["optimizer"], run["setting"]) in common]
    seeds = sorted({run["seed"] for run in runs})
    steps = sorted({report["steps"] for report in reports})
    command = f"python scripts/trainer_settings.py --combine {' '.join(map(str, folders))} --out {out}"
    header = (f"Trainer settings on the character-level GPT-2 of `tiny_lm` ({'/'.join(map(str, steps))} steps, "
              f"seeds {', '.join(map(str, seeds))}): the settings measured in all of "
              f"{', '.join(f'`{folder}`' for folder in folders)}. {CELLS} Command: `{command}`.")
    return runs, header, command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", default=list(DEFAULT_OPTIMIZERS),
                        help="lopt-hf eval optimizer specs: shipped names, folders, Hub ids, adamw:LR, ...")
    parser.add_argument("--schedules", nargs="+", default=["constant", "cosine", "linear"],
                        help="TrainingArguments.lr_scheduler_type values")
    parser.add_argument("--warmups", nargs="+", type=float, default=[0.0, 0.1],
                        help="TrainingArguments.warmup_steps values (< 1: a fraction of --steps)")
    parser.add_argument("--clips", nargs="+", type=float, default=[0.0, 1.0],
                        help="TrainingArguments.max_grad_norm values (0: no clipping)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest here)")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="DIR",
                        help="train nothing: report the runs of these earlier --out folders together")
    parser.add_argument("--out", type=Path, default=Path("docs/trainer_settings"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs, header, command = combine(args.combine, args.out) if args.combine else measure(args)
    summary = summarise(runs)
    table = markdown(summary, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table + "\n")
    steps = ([json.loads((folder / "results.json").read_text())["steps"] for folder in args.combine]
             if args.combine else [args.steps])
    report = {"steps": steps[0] if len(set(steps)) == 1 else steps, "seeds": sorted({run["seed"] for run in runs}),
              "command": command, "summary": summary, "runs": runs}
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table)
    print(f"written: {args.out / 'results.md'}, {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
