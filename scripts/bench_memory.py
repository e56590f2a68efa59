"""Peak memory of the per-element learned optimizers on one large tensor, against AdamW's, in one run.

    python scripts/bench_memory.py                          # 50M elements, every per-element learned optimizer
    python scripts/bench_memory.py --numel 16000000 --rules mlp_lopt

Each optimizer steps an ``nn.Linear(n, n)`` (``n² ≈ --numel``) twice in a fresh subprocess (``--runs`` of
them, the median reported); printed per optimizer: its state, the peak RSS over parameter + gradient, and
that peak's ratio to AdamW's (the goal: ≤ 2). ``--json`` prints the results as JSON instead of a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from lopt_hf.bench import MEMORY_RUNS, MEMORY_TENSOR_NUMEL, format_memory_results, run_memory_benchmark

# Every rule with a per-element network or per-element accumulators (Celo2 with its harness, Celo2-base without).
DEFAULT_RULES = ("small_fc_lopt", "mlp_lopt", "per_param_mlp", "celo2-base", "celo2", "celo", "celo_adam", "velo")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=MEMORY_TENSOR_NUMEL, help="elements of the one tensor")
    parser.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES), help="rules or presets to measure")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=MEMORY_RUNS,
                        help="fresh processes per optimizer, the median reported (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.numel <= 0:
        parser.error(f"--numel must be positive, got {args.numel}")
    if args.runs <= 0:
        parser.error(f"--runs must be positive, got {args.runs}")
    results = run_memory_benchmark(args.rules, args.numel, args.device, args.runs)
    if args.json:
        print(json.dumps([dataclasses.asdict(result) for result in results]))
    else:
        print(format_memory_results(results, args.numel, args.device))


if __name__ == "__main__":
    main()
