#!/usr/bin/env python
"""Meta-training speed: outer steps/s and inner steps/s of a meta-gradient estimator.

Default setting = the learned-optimizers tutorial's PES run: ``per_param_mlp`` rule, 32 tasks ×
1 antithetic pair, truncation 10, trajectories of 30 steps, inner MLP 64→128→10 on 8×8
Fashion-MNIST (digits if the Debian package ``dataset-fashion-mnist`` is missing), batch 128.
One timed outer step = ``estimate`` + all-reduce (multi-process) + an Adam(3e-4) step on theta.
Inner steps count every member (tasks × 2 × antithetic pairs × truncation).

    python scripts/bench_metatrain.py                      # 1 process, then 2 processes (gloo)
    python scripts/bench_metatrain.py --processes 1 --no-compile
    python scripts/bench_metatrain.py --processes 1 --steps 3 --repeats 1 --profile
    python scripts/bench_metatrain.py --family cnn --rule celo_adam --rule-option orthogonalize=true

``--family`` picks the inner problems: ``tutorial`` (the MLP above; ``--dataset``, ``--hidden`` and
``--batch-size`` set it) or one of the larger families of the shipped recipe (``configs/pretrained/
celo_adam_ns.yaml``): ``wide_mlp`` (784-256-256-10 MLPs on 28×28 images), ``cnn`` (28×28 CNNs, conv
8 and 16 channels) and ``transformer`` (character-level 2-layer transformers, width 32, 64 characters,
batch 16). After the meta-training timings as many models of the same family (tasks, initialisations and
batches drawn with seed 0), ``tasks × members`` of them one after another for the steps each member takes
per outer step, are trained by a plain PyTorch loop (``loss.backward()``, ``torch.optim.AdamW``, one
process, ``--threads`` threads), and the ratio of the two inner-step rates is printed (``--no-adamw-loop``
skips it).

With ``--processes N`` each process takes a contiguous block of tasks, runs with
``threads // N`` intra-op threads, and the ranks all-reduce ``grad_sum`` (torch.distributed,
gloo) as the outer loop does. Timings are the minimum over ``--repeats`` windows of
``--steps`` outer steps (the machine is shared, so minima are the stable statistic).

On a machine busy with other processes, a single process with 2 OpenMP threads can be 5-10x
slower than usual (threads spin at every parallel region's barrier while their partner waits
for a CPU); ``OMP_WAIT_POLICY=PASSIVE`` avoids that collapse but costs ~2x on an idle machine,
and 2 single-threaded processes are robust in both cases.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch

# The larger inner problems of the shipped recipe (configs/pretrained/celo_adam_ns.yaml), at the sizes the
# held-out evaluation uses for the MLP: (task family, its options; "dataset" resolves like --dataset).
FAMILY_PRESETS: dict[str, tuple[str, dict] | None] = {
    "tutorial": None,
    "wide_mlp": ("mlp_image", {"dataset": "fashion_mnist", "image_size": 28, "hidden_sizes": [256, 256],
                               "batch_size": 128}),
    "cnn": ("cnn_image", {"dataset": "fashion_mnist", "image_size": 28, "channels": [8, 16], "batch_size": 128}),
    "transformer": ("char_lm", {"corpus": "python_docs", "context_length": 64, "model_dim": 32, "num_heads": 2,
                                "num_layers": 2, "batch_size": 16}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--estimator", default="pes",
                        choices=["pes", "truncated_es", "truncated_bptt", "es", "full_bptt"])
    parser.add_argument("--rule", default="per_param_mlp")
    parser.add_argument("--rule-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a hyper-parameter of the rule (YAML value), e.g. orthogonalize=true; repeatable")
    parser.add_argument("--family", choices=sorted(FAMILY_PRESETS), default="tutorial",
                        help="the inner problems (default: the tutorial's MLP of --dataset/--hidden/--batch-size)")
    parser.add_argument("--no-adamw-loop", action="store_true",
                        help="skip the plain PyTorch AdamW loop over the same models")
    parser.add_argument("--tasks", type=int, default=32, help="task slots in total (split over processes)")
    parser.add_argument("--num-antithetic", type=int, default=1)
    parser.add_argument("--truncation-length", type=int, default=10)
    parser.add_argument("--unroll", type=int, default=30, help="trajectory length (min = max unroll)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128], help="inner MLP hidden sizes")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--steps", type=int, default=10, help="outer steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows (the minimum is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed outer steps (compilation happens here)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to benchmark")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="total intra-op threads")
    parser.add_argument("--no-compile", action="store_true", help="run the inner step eagerly")
    parser.add_argument("--json", action="store_true", help="print one JSON line per setting")
    parser.add_argument("--profile", action="store_true",
                        help="after timing (1 process), print a torch.profiler table of 3 outer steps")
    args = parser.parse_args(argv)
    args.rule_options = rule_options(args.rule_option, parser)
    return args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _resolve_dataset(name: str) -> str:
    from lopt_hf.data import DatasetUnavailableError, load_image_dataset

    try:
        load_image_dataset(name)
        return name
    except DatasetUnavailableError as error:
        print(f"[bench] {error}\n[bench] falling back to 'digits'", file=sys.stderr)
        return "digits"


def build_family(args: argparse.Namespace):  # noqa: ANN201  (a TaskFamily; imported lazily)
    """The inner problems of ``--family`` (its dataset resolved as ``--dataset`` is)."""
    from lopt_hf.metatrain.tasks import MLPImageTaskFamily, build_task_family

    preset = FAMILY_PRESETS[args.family]
    if preset is None:
        return MLPImageTaskFamily(datasets=args.dataset, hidden_sizes=args.hidden, batch_size=args.batch_size)
    name, options = preset
    options = dict(options)
    if "dataset" in options:
        options["datasets"] = args.dataset
        del options["dataset"]
    return build_task_family(name, **options)


def rule_options(items: list[str], parser: argparse.ArgumentParser) -> dict:
    """``--rule-option KEY=VALUE`` items as hyper-parameters, parsed as ``--set`` overrides are
    (:func:`lopt_hf.metatrain.config.parse_override`: YAML values, ``1e-3`` a float); a malformed item is a
    usage error."""
    from lopt_hf.metatrain.config import ConfigError, parse_override

    options = {}
    for item in items:
        try:
            key, value = parse_override(item)
        except ConfigError as err:
            parser.error(f"--rule-option: {err}")
        options[key] = value
    return options


def build_rule(args: argparse.Namespace):  # noqa: ANN201  (an UpdateRule; imported lazily)
    """``--rule`` with its ``--rule-option`` hyper-parameters."""
    from lopt_hf.rules import build_rule as build

    return build(args.rule, **args.rule_options)


def adamw_loop(args: argparse.Namespace, models: int, steps: int) -> float:
    """Inner steps/s of a plain PyTorch loop training ``models`` of the family's problems one after
    another, ``steps`` each (the meta-trainer's steps per member and outer step): forward,
    ``loss.backward()``, ``torch.optim.AdamW`` (lr 1e-3, foreach), the family's own model code, tasks
    drawn with seed 0; min over ``--repeats`` windows, after one untimed pass (warm-up)."""
    torch.set_num_threads(args.threads)
    family = build_family(args)
    generator = torch.Generator().manual_seed(0)
    problems = []
    for _ in range(models):
        task = family.sample_task(generator)
        params = {key: value.clone().requires_grad_(True)
                  for key, value in family.init_params(task, generator).items()}
        batches = family.sample_batches(task, generator, steps)
        optimizer = torch.optim.AdamW(list(params.values()), lr=1e-3, foreach=True)
        problems.append((task, params, [{key: value[t] for key, value in batches.items()} for t in range(steps)],
                         optimizer))

    def train_all() -> None:
        for task, params, batches, optimizer in problems:
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                family.loss(params, task, batch).backward()
                optimizer.step()

    train_all()
    windows = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        train_all()
        windows.append(time.perf_counter() - start)
    return models * steps / min(windows)


def _worker(rank: int, world_size: int, args: argparse.Namespace, port: int, results: dict) -> None:
    torch.set_num_threads(max(1, args.threads // world_size))
    if world_size > 1:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from lopt_hf.metatrain.estimators import build_estimator

    family = build_family(args)
    rule = build_rule(args)
    estimator = build_estimator(args.estimator, family, rule, truncation_length=args.truncation_length,
                                min_unroll=args.unroll, max_unroll=args.unroll, num_antithetic=args.num_antithetic,
                                std=0.01, seed=0, compile=not args.no_compile)
    per_rank = args.tasks // world_size
    task_ids = list(range(rank * per_rank, (rank + 1) * per_rank))
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    theta = {key: value.requires_grad_(True) for key, value in theta.items()}
    optimizer = torch.optim.Adam(list(theta.values()), lr=3e-4)
    state = estimator.init_state({k: v.detach() for k, v in theta.items()}, task_ids, 0)

    def outer_step(step: int) -> float:
        nonlocal state
        result = estimator.estimate({k: v.detach() for k, v in theta.items()}, state, task_ids, step)
        state = result.new_state
        grads = [result.grad_sum[key] for key in theta]
        loss = result.meta_loss_sum.detach().clone()
        if world_size > 1:
            import torch.distributed as dist

            flat = torch.cat([grad.reshape(-1) for grad in grads] + [loss.reshape(1)])
            dist.all_reduce(flat)
            sizes = [grad.numel() for grad in grads]
            grads = [piece.reshape(grad.shape) for piece, grad in zip(flat[:-1].split(sizes), grads)]
            loss = flat[-1]
        for value, grad in zip(theta.values(), grads):
            value.grad = grad / args.tasks
        optimizer.step()
        return float(loss) / args.tasks

    step = 0
    for _ in range(args.warmup):
        outer_step(step)
        step += 1
    windows = []
    for _ in range(args.repeats):
        if world_size > 1:
            torch.distributed.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            meta_loss = outer_step(step)
            step += 1
        windows.append(time.perf_counter() - start)
    if world_size > 1:
        # Every rank's window ends when the slowest rank's does (all-reduce each step).
        tensor = torch.tensor(windows)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        windows = tensor.tolist()
        torch.distributed.destroy_process_group()
    if rank == 0:
        results.update(windows=windows, meta_loss=meta_loss)
    if args.profile and world_size == 1:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(3):
                outer_step(step)
                step += 1
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def _run(world_size: int, args: argparse.Namespace) -> dict:
    if world_size == 1:
        results: dict = {}
        _worker(0, 1, args, 0, results)
        return results
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world_size, args, _free_port(), results), nprocs=world_size, join=True)
    return dict(results)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.dataset = _resolve_dataset(args.dataset)
    members = (2 * args.num_antithetic) if args.estimator in ("pes", "truncated_es", "es") else 1
    steps = args.truncation_length if args.estimator in ("pes", "truncated_es", "truncated_bptt") else args.unroll
    problems = args.family if FAMILY_PRESETS[args.family] is None or "dataset" not in FAMILY_PRESETS[args.family][1] \
        else f"{args.family} on {args.dataset}"
    rates = {}
    for world_size in args.processes:
        if args.tasks % world_size:
            raise SystemExit(f"--tasks {args.tasks} is not divisible by {world_size} processes")
        results = _run(world_size, args)
        seconds = min(results["windows"]) / args.steps
        inner = args.tasks * members * steps / seconds
        rates[world_size] = inner
        line = {"processes": world_size, "estimator": args.estimator, "family": args.family, "rule": args.rule,
                "dataset": args.dataset, "compile": not args.no_compile, "outer_steps_per_s": 1.0 / seconds,
                "inner_steps_per_s": inner, "ms_per_outer_step": 1e3 * seconds,
                "all_windows_ms_per_step": [1e3 * w / args.steps for w in results["windows"]],
                "meta_loss": results["meta_loss"]}
        if args.json:
            print(json.dumps(line))
        else:
            print(f"{world_size} process(es), {args.estimator}, {args.rule}, {args.tasks} tasks x {members} members x "
                  f"{steps} steps, {problems}: {1.0 / seconds:.2f} outer steps/s, "
                  f"{inner:,.0f} inner steps/s ({1e3 * seconds:.0f} ms per outer step; windows "
                  f"{', '.join(f'{1e3 * w / args.steps:.0f}' for w in results['windows'])} ms)")
    if args.no_adamw_loop:
        return
    models = args.tasks * members
    loop = adamw_loop(args, models, steps)
    line = {"adamw_loop_inner_steps_per_s": loop, "models": models, "steps": steps, "threads": args.threads,
            "family": args.family,
            "loop_over_metatrain": {str(world_size): loop / rate for world_size, rate in rates.items()}}
    if args.json:
        print(json.dumps(line))
    else:
        ratios = ", ".join(f"{loop / rate:.2f}x with {world_size} process(es)" for world_size, rate in rates.items())
        print(f"plain PyTorch loop, AdamW, the same {models} models x {steps} steps one after another, {problems}, "
              f"{args.threads} thread(s): {loop:,.0f} inner steps/s; loop / meta-training: {ratios}")


if __name__ == "__main__":
    main()
