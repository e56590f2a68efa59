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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--estimator", default="pes",
                        choices=["pes", "truncated_es", "truncated_bptt", "es", "full_bptt"])
    parser.add_argument("--rule", default="per_param_mlp")
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
    return parser.parse_args(argv)


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


def _worker(rank: int, world_size: int, args: argparse.Namespace, port: int, results: dict) -> None:
    torch.set_num_threads(max(1, args.threads // world_size))
    if world_size > 1:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from lopt_hf.metatrain.estimators import build_estimator
    from lopt_hf.metatrain.tasks import MLPImageTaskFamily
    from lopt_hf.rules import build_rule

    family = MLPImageTaskFamily(datasets=args.dataset, hidden_sizes=args.hidden, batch_size=args.batch_size)
    rule = build_rule(args.rule)
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
    for world_size in args.processes:
        if args.tasks % world_size:
            raise SystemExit(f"--tasks {args.tasks} is not divisible by {world_size} processes")
        results = _run(world_size, args)
        seconds = min(results["windows"]) / args.steps
        steps = args.truncation_length if args.estimator in ("pes", "truncated_es", "truncated_bptt") else args.unroll
        inner = args.tasks * members * steps / seconds
        line = {"processes": world_size, "estimator": args.estimator, "dataset": args.dataset,
                "compile": not args.no_compile, "outer_steps_per_s": 1.0 / seconds, "inner_steps_per_s": inner,
                "ms_per_outer_step": 1e3 * seconds,
                "all_windows_ms_per_step": [1e3 * w / args.steps for w in results["windows"]],
                "meta_loss": results["meta_loss"]}
        if args.json:
            print(json.dumps(line))
        else:
            print(f"{world_size} process(es), {args.estimator}, {args.tasks} tasks x {members} members x "
                  f"{steps} steps, {args.dataset}: {1.0 / seconds:.2f} outer steps/s, "
                  f"{inner:,.0f} inner steps/s ({1e3 * seconds:.0f} ms per outer step; windows "
                  f"{', '.join(f'{1e3 * w / args.steps:.0f}' for w in results['windows'])} ms)")


if __name__ == "__main__":
    main()
