#!/usr/bin/env python
"""LoLO ablation: naive PES vs behaviour cloning only vs full LoLO, at equal meta-training budget.

Each variant meta-trains ``small_fc_lopt`` with PES on digits MLPs (64-32-10) with *short*
trajectories (``--unroll`` inner steps), the same number of outer steps, task slots and
truncation length (so the same number of inner steps is unrolled by the learned optimizer;
behaviour cloning additionally runs the cheap Adam expert). Each learned optimizer is then
evaluated at ``--eval-factor`` × the meta-training unroll length on fresh digits MLPs (several
seeds), against AdamW (lr 1e-3 / wd 1e-4, the paper's baseline, and a tuned lr 1e-2); test loss
and accuracy are on the held-out digits test split. Writes ``results.json``, ``results.md``
and ``curves.png`` into ``--out``.

    python scripts/lolo_ablation.py                       # ≈ 5–7 min on one CPU core
    python scripts/lolo_ablation.py --outer-steps 50 --eval-seeds 0   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {
    "naive PES": None,
    "BC only": {"buffer_size": 0, "behaviour_cloning": True},
    "LoLO (buffer + BC)": {"buffer_size": 4, "behaviour_cloning": True},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/lolo_ablation", help="output folder (default: %(default)s)")
    parser.add_argument("--outer-steps", type=int, default=300, help="meta-training outer steps per variant")
    parser.add_argument("--num-tasks", type=int, default=8, help="PES task slots per outer step")
    parser.add_argument("--truncation", type=int, default=10, help="PES truncation length")
    parser.add_argument("--unroll", type=int, default=50, help="meta-training trajectory length (inner steps)")
    parser.add_argument("--eval-factor", type=int, default=10, help="evaluation length = factor × --unroll")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2], help="evaluation model seeds")
    parser.add_argument("--p-threshold", type=float, default=0.5, help="LoLO P_th")
    parser.add_argument("--meta-lr", type=float, default=3e-3, help="meta-optimizer (AdamW) lr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    return parser


def metatrain(name: str, lolo: dict | None, args: argparse.Namespace, root: Path) -> tuple[dict, list[float], float]:
    from lopt_hf.metatrain.config import config_from_dict
    from lopt_hf.metatrain.trainer import MetaTrainer

    values = {
        "name": name.split()[0].lower(), "seed": args.seed, "outer_steps": args.outer_steps,
        "rule": {"name": "small_fc_lopt", "config": {}},
        "task": {"dataset": "digits", "hidden_sizes": [32], "batch_size": 128, "image_size": 8},
        "estimator": {"name": "pes", "num_tasks": args.num_tasks, "truncation_length": args.truncation,
                      "min_unroll": args.unroll, "max_unroll": args.unroll, "std": 0.01, "compile": False},
        "meta_optimizer": {"lr": args.meta_lr, "grad_clip": None},
        "checkpoint_every": 0, "log_with": [], "num_threads": 1,
        "output_dir": str(root / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "")),
        "lolo": None if lolo is None else {**lolo, "p_threshold": args.p_threshold, "expert_lr": 1e-3},
    }
    config = config_from_dict(values)
    trainer = MetaTrainer(config, progress=False)
    start = time.perf_counter()
    result = trainer.train()
    return result.theta, result.meta_losses, time.perf_counter() - start


def evaluate(candidates: dict, steps: int, seeds: list[int]) -> tuple[dict, dict]:
    """Train the ``digits_mlp`` evaluation task (64-32-10 MLP, batch 128) with every candidate from every seed."""
    from lopt_hf.evaluation.tasks import get_task

    task = get_task("digits_mlp")
    curves, finals = {}, {}
    tail = max(1, steps // 10)
    for name, make in candidates.items():
        runs, rows = [], []
        for seed in seeds:
            record = task.run(make, steps=steps, seed=seed)
            losses = [value if math.isfinite(value) else float("inf") for value in record.train_losses]
            losses += [float("inf")] * (steps - len(losses))  # a diverged run stops at its first non-finite loss
            runs.append(losses)
            rows.append((sum(losses[-tail:]) / tail, sum(losses[:steps // 10]) / max(1, steps // 10),
                         record.test_loss, record.test_accuracy))
        curves[name] = [sum(run[i] for run in runs) / len(runs) for i in range(steps)]
        mean = lambda i: sum(row[i] for row in rows) / len(rows)
        finals[name] = {f"train loss (last {tail})": mean(0), f"train loss (first {steps // 10}, = meta-train horizon)":
                        mean(1), "test loss": mean(2), "test accuracy": mean(3)}
    return finals, curves


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from lopt_hf.hub import create_artifact
    from lopt_hf.load import load_lopt

    thetas, meta_curves, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="lolo_ablation_") as tmp:
        for name in args.variants:
            print(f"meta-training {name} ...", file=sys.stderr, flush=True)
            thetas[name], meta_curves[name], seconds[name] = metatrain(name, VARIANTS[name], args, Path(tmp))
            print(f"  {seconds[name]:.1f} s, final meta-loss {sum(meta_curves[name][-20:]) / 20:.4f}",
                  file=sys.stderr, flush=True)
    steps = args.eval_factor * args.unroll
    candidates = {}
    for name, theta in thetas.items():
        artifact = create_artifact("small_fc_lopt", theta=theta, rule_config={})
        candidates[name] = (lambda artifact: lambda model: load_lopt(artifact, model))(artifact)
    candidates["AdamW (lr 1e-3, wd 1e-4)"] = lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3,
                                                                            weight_decay=1e-4)
    candidates["AdamW (lr 1e-2, wd 1e-4)"] = lambda model: torch.optim.AdamW(model.parameters(), lr=1e-2,
                                                                            weight_decay=1e-4)
    print(f"evaluating at {steps} steps ...", file=sys.stderr, flush=True)
    finals, curves = evaluate(candidates, steps, list(args.eval_seeds))

    payload = {"command": "python scripts/lolo_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": vars(args), "eval_steps": steps, "metatrain_seconds": seconds,
               "final_meta_loss_last20": {k: sum(v[-20:]) / len(v[-20:]) for k, v in meta_curves.items()},
               "results": finals, "eval_curves": curves, "meta_loss_curves": meta_curves}
    (out / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    keys = list(next(iter(finals.values())))
    lines = [f"Digits MLP 64-32-10, batch 128; meta-trained on {args.unroll}-step trajectories "
             f"({args.outer_steps} outer steps × {args.num_tasks} slots × truncation {args.truncation}), "
             f"evaluated for {steps} steps ({args.eval_factor}×), mean over seeds {args.eval_seeds}; "
             "test = 359 held-out digits.", "",
             "| optimizer | meta-train s | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for name, row in finals.items():
        secs = f"{seconds[name]:.0f}" if name in seconds else "–"
        lines.append(f"| {name} | {secs} | " + " | ".join(f"{row[key]:.4f}" for key in keys) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lopt_hf.plotting import smooth

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, curve in curves.items():
        axes[0].plot(smooth(curve, 10), label=name, linestyle="--" if name.startswith("AdamW") else "-")
    axes[0].axvline(args.unroll, color="grey", linewidth=0.8, linestyle=":", label="meta-train unroll")
    axes[0].set_yscale("log")
    axes[0].set(xlabel="inner step", ylabel="train loss (mean over seeds, smoothed)",
                title=f"evaluation at {steps} steps ({args.eval_factor}× meta-train unroll)")
    axes[0].legend(fontsize=8)
    for name, curve in meta_curves.items():
        axes[1].plot(smooth(curve, 20), label=name)
    axes[1].set(xlabel="outer step", ylabel="meta-loss (task, smoothed)", title="meta-training")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print(f"wrote {out}/results.json, results.md, curves.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
