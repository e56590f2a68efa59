"""Choose a checkpoint of a meta-training run on validation tasks (never on ``--suite heldout``).

    python scripts/select_checkpoint.py runs/celo_adam_mix_tf --every 100 --out evals/select_tf

Exports every ``--every``-th checkpoint of the run (``lopt-hf export``, no card evaluation) into
``OUT/step-N``, runs ``lopt-hf eval --suite validation`` on all of them and AdamW at lr 1e-3 (same
tasks, seeds and steps), ranks them by the geometric mean of loss ÷ AdamW's
(:mod:`lopt_hf.evaluation.selection`) and writes ``OUT/validation/`` (the report) and
``OUT/selection.md``; the last line printed is the chosen artifact folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lopt_hf.evaluation import VALIDATION_TASKS, run_evaluation, write_report
from lopt_hf.evaluation.selection import rank_checkpoints, ranking_markdown
from lopt_hf.metatrain.checkpoint import list_checkpoints
from lopt_hf.publish.export import export_checkpoint

BASELINE = "adamw:1e-3"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the run folder (holding checkpoints/step-…)")
    parser.add_argument("--every", type=int, default=100, help="take checkpoints whose step is a multiple of this")
    parser.add_argument("--from-step", type=int, default=1, help="skip checkpoints before this step (default 1)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per validation run (default 200)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="validation seeds (default 0 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", required=True, help="folder for the exported checkpoints and the report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error("--every must be >= 1")
    chosen = [(step, path) for step, path in list_checkpoints(Path(args.run) / "checkpoints")
              if step % args.every == 0 and step >= args.from_step]
    if not chosen:
        print(f"select_checkpoint: no checkpoint of {args.run} at a multiple of {args.every} from step "
              f"{args.from_step}", file=sys.stderr)
        return 2
    out = Path(args.out)
    labels = {}
    for step, path in chosen:
        label = f"step-{step}"
        export_checkpoint(path, out / label, evaluate=False)
        labels[label] = out / label
    specs = [BASELINE, *(f"{label}={folder}" for label, folder in labels.items())]
    results = run_evaluation(list(VALIDATION_TASKS), specs, steps=args.steps, seeds=args.seeds,
                             progress=not args.no_progress, threads=args.threads)
    write_report(results, out / "validation")
    scores = rank_checkpoints(results, list(labels), BASELINE)
    table = ranking_markdown(scores, BASELINE)
    (out / "selection.md").write_text(
        f"Checkpoints of {args.run} on {', '.join(VALIDATION_TASKS)} ({args.steps} steps, seeds {args.seeds}), "
        f"best first:\n\n{table}\n", encoding="utf-8")
    print(table)
    print(labels[scores[0].label])
    return 0


if __name__ == "__main__":
    sys.exit(main())
