"""Does a learned optimizer clear the bar for shipping (issue 15)? Read from ``lopt-hf eval`` reports.

    lopt-hf eval --suite heldout --steps 200 --seeds 0 1 --out evals/x \\
        --optimizers mine=runs/x/final celo-adam=amoudgl/celo-adam adamw:1e-3 adamw-grid
    python scripts/check_bar.py evals/x/steps200 evals/x/steps2000 --candidate mine --reference celo-adam

Reports of one length may come from several runs (say the baselines once, each candidate later) when
they ran the same seeds. Prints the table and the three conditions of :mod:`lopt_hf.evaluation.bar`
(``--out FILE`` also writes them as markdown); exits 0 when the bar is met, 1 when it is not. Several
``--candidate`` labels print one table with a column each (an ablation); exit 0 when all meet the bar.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lopt_hf.evaluation.bar import check_bar, comparison_markdown, load_reports, verdict_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="results.json files of `lopt-hf eval`, or the folders holding them")
    parser.add_argument("--candidate", required=True, nargs="+",
                        help="the optimizer label judged (as in the reports); several: one column each")
    parser.add_argument("--reference", default="celo-adam",
                        help="the learned optimizer to beat on average normalised loss (default: celo-adam)")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                        help="judge only these tasks of the reports (default: every task they hold)")
    parser.add_argument("--out", default=None, help="also write the verdict to this markdown file")
    args = parser.parse_args(argv)
    try:
        reports = load_reports(args.reports)
        verdicts = [check_bar(reports, candidate, args.reference, args.tasks) for candidate in args.candidate]
        text = verdict_markdown(verdicts[0]) if len(verdicts) == 1 else comparison_markdown(verdicts)
    except (OSError, ValueError, KeyError) as err:
        print(f"check_bar: {err}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0 if all(verdict.passed for verdict in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
