"""One tiny training run per process, for the multi-process tests (launched by accelerate or torchrun).

Modes:

* ``trainer`` — ``transformers.Trainer`` with ``trainer_optimizer(artifact)`` and
  ``LearnedOptimizerCallback``; under a launcher Trainer wraps the model in DDP itself (gloo on CPU);
* ``ddp`` — a plain loop: ``DistributedDataParallel(model)``, ``load_lopt(artifact, model)``,
  ``DistributedSampler``.

Each rank writes ``rank<N>.safetensors`` (its parameters after training) and ``rank<N>.json``
(losses, world size, backend, what wrapped the model) into ``--out``.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import lm_data, tiny_gpt2, train_losses, training_args  # noqa: E402


def save_rank(out: Path, rank: int, model: torch.nn.Module, info: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    params = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(params, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(info))


def run_trainer(args: argparse.Namespace) -> None:
    from transformers import Trainer

    from lopt_hf import LearnedOptimizerCallback, trainer_optimizer
    from lopt_hf.trainer import unwrap_optimizer

    tokenizer, dataset = lm_data()
    model = tiny_gpt2(tokenizer.vocab_size, dropout=0.0)
    trainer = Trainer(model=model, args=training_args(args.out / "trainer", max_steps=args.steps,
                                                      per_device_train_batch_size=4),
                      train_dataset=dataset, optimizer_cls_and_kwargs=trainer_optimizer(args.artifact))
    LearnedOptimizerCallback.attach(trainer)  # also hands rules that read the loss each step's (averaged) loss
    trainer.train()
    optimizer = unwrap_optimizer(trainer.optimizer)
    save_rank(args.out, trainer.args.process_index, model, {
        "losses": train_losses(trainer), "world_size": trainer.args.world_size,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "wrapped": type(trainer.model_wrapped).__name__, "optimizer": type(optimizer).__name__,
        "total_steps": optimizer.total_steps, "distributed_type": str(trainer.accelerator.distributed_type)})
    # Tear down in order (as in run_ddp): a DDP reducer or gloo thread that outlives its process
    # group can abort the process at exit ("terminate called without an active exception").
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        del trainer
        gc.collect()  # attach() makes the trainer part of a reference cycle: free its DDP reducer now
        dist.destroy_process_group()


def run_ddp(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from lopt_hf import load_lopt

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tokenizer, dataset = lm_data()
    model = tiny_gpt2(tokenizer.vocab_size, dropout=0.0)
    optimizer = load_lopt(args.artifact, model)  # the bare model: layouts and harness see its modules
    optimizer.set_total_steps(args.steps)  # scheduled rules (Celo, VeLO) plan by it; others ignore it
    ddp_model = DistributedDataParallel(model)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    losses: list[float] = []
    epoch = 0
    while len(losses) < args.steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = ddp_model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= world_size
            optimizer.step(loss=mean_loss)  # the same loss on every rank: rules that read it stay in sync
            losses.append(float(mean_loss))
            if len(losses) == args.steps:
                break
        epoch += 1
    save_rank(args.out, rank, model, {"losses": losses, "world_size": world_size, "backend": dist.get_backend(),
                                      "wrapped": type(ddp_model).__name__, "optimizer": type(optimizer).__name__})
    # Tear down in order: a DDP reducer that outlives its process group can hang the process at exit.
    dist.barrier()
    del ddp_model
    dist.destroy_process_group()


def main() -> None:
    # A rank stuck in a collective would hang the test until its timeout: fail fast, with stacks.
    faulthandler.dump_traceback_later(60, exit=True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["trainer", "ddp"], required=True)
    parser.add_argument("--artifact", required=True, help="learned-optimizer artifact folder or Hub repo id")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    (run_trainer if args.mode == "trainer" else run_ddp)(args)


if __name__ == "__main__":
    main()
