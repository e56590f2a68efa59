"""Training throughput of a tiny GPT-2 under ``transformers.Trainer``: learned optimizers vs AdamW.

By default Celo2, Celo2-base and lopt_hf's default shipped optimizer (``lopt-hf/celo-adam-ns``); any other
learned optimizer — shipped name, artifact folder or Hub repo id — can be named in ``--optimizers``.
Every optimizer trains the same ``GPT2LMHeadModel`` (built from a ``GPT2Config``, no download,
same seed) on random token sequences through ``Trainer(optimizers=(optimizer, None))`` with the
same ``TrainingArguments``. Celo2 is set up the way a user would: the published checkpoint
format (``theta.state``; by default the test fixture ``tests/fixtures/refvectors/celo2_theta1.state``,
pass ``--theta`` for the real ``hf download amoudgl/celo2`` file) is converted with
``lopt_hf.convert.celo2.convert_celo2`` (what ``lopt-hf convert celo2 THETA OUT --variant ...``
runs) and loaded with ``load_lopt(OUT, model)``, which routes embeddings and 1-D tensors to the
harness's AdamW for ``celo2``. Any other learned optimizer is ``load_lopt(NAME, model)`` with its own
settings, plus ``LearnedOptimizerCallback.attach(trainer)`` (the planned steps and each step's loss, which
scheduled rules such as Celo-Adam read). AdamW is plain ``torch.optim.AdamW(model.parameters())``.

A callback times every step (from ``on_step_begin`` to ``on_step_end``, plus the data loading in
between steps) and the optimizer step alone (``on_pre_optimizer_step`` → ``on_optimizer_step``).
The first ``--warmup`` steps are left out. Runs are interleaved — each round trains every
optimizer once, in rotating order — so that load from other processes hits all of them alike;
the table reports the median and the best round.

Example::

    python scripts/bench_trainer.py --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

DEFAULT_THETA = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "refvectors" / "celo2_theta1.state"
CONVERTED = ("celo2", "celo2-base")  # converted from --theta, with --lr
OPTIMIZERS = ("adamw", *CONVERTED, "lopt-hf/celo-adam-ns")  # the last: lopt_hf's default shipped optimizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), metavar="NAME",
                        help="what to time: adamw (the reference of the ratio column), celo2, celo2-base, or a "
                             "learned optimizer's shipped name, folder or Hub repo id")
    parser.add_argument("--theta", type=Path, default=DEFAULT_THETA, help="Celo2 theta.state to convert")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (= n_positions)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the measurement")
    parser.add_argument("--steps", type=int, default=30, help="measured steps after the warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one run per optimizer each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="learning rate of AdamW, celo2 and celo2-base (others keep their own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="also time each learned optimizer that compile=True changes with it (rows NAME+compile; "
                             "the warm-up steps include the compilation)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from lopt_hf.evaluation.lm import make_char_gpt2

    return make_char_gpt2(args.vocab_size, args.seq_len, n_layer=args.n_layer, n_embd=args.n_embd,
                          n_head=args.n_head, seed=args.seed)


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences; the labels are the inputs (Trainer's causal-LM loss shifts them)."""

    def __init__(self, count: int, seq_len: int, vocab_size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab_size, (count, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def make_step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall-clock ends of every step and the duration of every optimizer step."""

        def __init__(self) -> None:
            self.step_ends: list[float] = []
            self.optimizer_seconds: list[float] = []
            self._optimizer_start = 0.0
            self.threads = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.threads = torch.get_num_threads()
            self.step_ends.append(time.perf_counter())  # "step -1" ends when training starts

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self._optimizer_start = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_seconds.append(time.perf_counter() - self._optimizer_start)

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

    return StepTimer()


def make_optimizer(name: str, model: torch.nn.Module, artifacts: dict[str, Path], lr: float) -> torch.optim.Optimizer:
    """AdamW, or the learned optimizer ``name`` (``NAME+compile``: with ``compile=True``)."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    from lopt_hf import load_lopt
    from lopt_hf.bench import COMPILED

    compile = name.endswith(COMPILED)
    name = name.removesuffix(COMPILED)
    if name in artifacts:  # converted here: the --lr of the comparison
        return load_lopt(artifacts[name], model, lr=lr, compile=compile)
    return load_lopt(name, model, compile=compile)  # a shipped / local / Hub learned optimizer, its own settings


def train_once(name: str, args: argparse.Namespace, artifacts: dict[str, Path], workdir: Path) -> dict[str, float]:
    from transformers import Trainer, TrainingArguments

    model = build_model(args)
    optimizer = make_optimizer(name, model, artifacts, args.lr)
    total = args.warmup + args.steps
    training_args = TrainingArguments(
        output_dir=str(workdir / name), max_steps=total, per_device_train_batch_size=args.batch_size,
        report_to=[], use_cpu=True, logging_steps=10**9, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=args.seed)
    timer = make_step_timer()
    dataset = RandomTokens(total * args.batch_size, args.seq_len, args.vocab_size, args.seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, optimizers=(optimizer, None),
                      callbacks=[timer])
    if name != "adamw" and name not in artifacts:
        from lopt_hf import LearnedOptimizerCallback

        LearnedOptimizerCallback.attach(trainer)  # the planned steps and each loss (scheduled rules read them)
    trainer.train()
    from lopt_hf.bench import step_flops

    matrix_flops = step_flops(optimizer)  # the learned step's matrix products (None: AdamW, element-wise rules)
    ends = timer.step_ends[args.warmup:]  # end of the last warm-up step ... end of the last step
    seconds = ends[-1] - ends[0]
    steps = len(ends) - 1
    step_seconds = [b - a for a, b in itertools.pairwise(ends)]
    optimizer_seconds = timer.optimizer_seconds[args.warmup:]
    return {"samples_per_s": steps * args.batch_size / seconds, "step_ms": 1e3 * seconds / steps,
            "optimizer_ms": 1e3 * sum(optimizer_seconds) / steps,
            "optimizer_share": sum(optimizer_seconds) / seconds,
            # medians per step: robust to bursts of load from other processes
            "step_ms_median": 1e3 * statistics.median(step_seconds),
            "optimizer_ms_median": 1e3 * statistics.median(optimizer_seconds),
            "matrix_gflop": (matrix_flops or 0.0) / 1e9,
            "threads": timer.threads}


def convert_artifacts(theta: Path, names: list[str], root: Path) -> dict[str, Path]:
    from lopt_hf.convert.celo2 import convert_celo2

    artifacts = {}
    for name in names:
        if name in CONVERTED:
            artifacts[name] = root / name
            convert_celo2(theta, artifacts[name], variant=name)
    return artifacts


def summarize(results: dict[str, list[dict[str, float]]], sgemm_gflops: float) -> dict[str, dict[str, float]]:
    """Per optimizer: throughput of the median and of the best round, medians per step, and the floor: its
    step's matrix products (per-element network, Newton–Schulz) at ``sgemm_gflops``, the matmul rate measured
    in the same run — with ``ratio_at_floor``, the throughput ratio to AdamW if the step cost only that."""
    summary = {}
    for name, runs in results.items():
        throughputs = [run["samples_per_s"] for run in runs]
        step_ms = statistics.median(run["step_ms_median"] for run in runs)
        optimizer_ms = statistics.median(run["optimizer_ms_median"] for run in runs)
        summary[name] = {
            "samples_per_s_median": statistics.median(throughputs),
            "samples_per_s_best": max(throughputs),
            "step_ms_median": step_ms,
            "optimizer_ms_median": optimizer_ms,
            "optimizer_share_median": optimizer_ms / step_ms,
            "floor_ms": 1e3 * runs[0]["matrix_gflop"] / sgemm_gflops,
        }
    if "adamw" in summary:
        for name, row in summary.items():
            row["ratio_median"] = row["samples_per_s_median"] / summary["adamw"]["samples_per_s_median"]
            row["ratio_best"] = row["samples_per_s_best"] / summary["adamw"]["samples_per_s_best"]
            if row["floor_ms"]:  # AdamW's step with this optimizer's floor in place of AdamW's own update
                adamw = summary["adamw"]
                row["ratio_at_floor"] = adamw["step_ms_median"] / (
                    adamw["step_ms_median"] - adamw["optimizer_ms_median"] + row["floor_ms"])
    return summary


def format_table(summary: dict[str, dict[str, float]], args: argparse.Namespace, num_params: int,
                 threads: int, sgemm_gflops: float) -> str:
    width = max(12, *(len(name) + 2 for name in summary))
    lines = [(f"GPT-2 n_layer={args.n_layer} n_embd={args.n_embd} n_head={args.n_head} vocab={args.vocab_size} "
              f"({num_params / 1e6:.2f}M parameters), batch {args.batch_size} x {args.seq_len} tokens, "
              f"{args.steps} steps after {args.warmup} warm-up, {args.rounds} rounds, torch {torch.__version__}, "
              f"threads={threads}, sgemm {sgemm_gflops:.0f} GFLOP/s"),
             "samples/s: median round (best round); step / optimizer ms: median step over the rounds",
             (f"{'optimizer':<{width}}{'samples/s':>11}{'(best)':>9}{'x AdamW':>9}{'(best)':>8}{'step ms':>9}"
              f"{'optim ms':>10}{'optim share':>13}{'floor ms':>10}{'x AdamW at floor':>18}")]
    for name, row in summary.items():
        ratio = f"{row['ratio_median']:>9.2f}{row['ratio_best']:>8.2f}" if "ratio_median" in row else f"{'':>17}"
        floor = f"{row['floor_ms']:>10.1f}" if row["floor_ms"] else f"{'-':>10}"
        at_floor = f"{row['ratio_at_floor']:>18.2f}" if "ratio_at_floor" in row else f"{'-':>18}"
        lines.append(f"{name:<{width}}{row['samples_per_s_median']:>11.1f}{row['samples_per_s_best']:>9.1f}{ratio}"
                     f"{row['step_ms_median']:>9.1f}{row['optimizer_ms_median']:>10.1f}"
                     f"{100 * row['optimizer_share_median']:>12.1f}%{floor}{at_floor}")
    lines.append("floor: the learned step's matrix products (per-element network, Newton–Schulz) at the sgemm rate of "
                 "this run; x AdamW at floor: AdamW's training step with that floor in place of AdamW's update "
                 "(the best any engine could do at this rate)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*loss_type=None.*")
    from lopt_hf.bench import sgemm_gflops

    gflops = sgemm_gflops()  # the matmul rate the floors are computed with, measured now
    names = list(dict.fromkeys(args.optimizers))
    if args.compile:  # each learned optimizer that compile=True changes also compiled, a row of its own (same run)
        from lopt_hf import load_artifact
        from lopt_hf.bench import COMPILED
        from lopt_hf.kernels.compiled import takes_compiled_path

        names += [name + COMPILED for name in names  # (the converted ones are Celo2, which compiles)
                  if name != "adamw" and (name in CONVERTED or takes_compiled_path(load_artifact(name).rule))]
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        artifacts = convert_artifacts(args.theta, names, root / "artifacts")
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                run = train_once(name, args, artifacts, root / "runs")
                results[name].append(run)
                print(f"round {round_index + 1}/{args.rounds} {name:<20} {run['samples_per_s']:8.1f} samples/s, "
                      f"step {run['step_ms']:7.1f} ms (median {run['step_ms_median']:.1f}), optimizer "
                      f"{run['optimizer_ms']:6.1f} ms (median {run['optimizer_ms_median']:.1f})", flush=True)
    summary = summarize(results, gflops)
    num_params = sum(p.numel() for p in build_model(args).parameters())
    threads = results[names[0]][0]["threads"]
    print()
    print(format_table(summary, args, num_params, threads, gflops))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results,
                                         "sgemm_gflops": gflops, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
