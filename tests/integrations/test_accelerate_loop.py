"""A plain Accelerate loop: ``accelerator.prepare(model, load_lopt(...), dataloader)``, save_state / load_state."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DataLoaderConfiguration, set_seed
from support import lm_data, tiny_gpt2
from torch.utils.data import DataLoader

from lopt_hf import LearnedOptimizer, load_lopt

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TOTAL_STEPS = 10
SAVE_AT = 5  # mid-epoch: 55 blocks / batch 8 = 7 batches per epoch



def setup(artifact: str, model_seed: int = 0):
    """Fresh accelerator, model (dropout on), learned optimizer and shuffled dataloader, all prepared.

    For an exact resume the data order and the dropout RNG must not depend on what ran before:
    the seedable sampler gets an explicit ``data_seed`` (otherwise it takes
    ``torch.initial_seed()`` at ``prepare`` time) and the DataLoader its own generator (otherwise
    starting an iterator — e.g. ``skip_first_batches`` after ``load_state`` — draws from the global
    RNG that dropout uses).
    """
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                                  data_seed=0))
    set_seed(0)
    tokenizer, dataset = lm_data()
    model = tiny_gpt2(tokenizer.vocab_size, seed=model_seed)
    optimizer = load_lopt(artifact, model)
    optimizer.set_total_steps(TOTAL_STEPS)
    loader = DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return accelerator, model, optimizer, loader


def train(accelerator, model, optimizer, loader, start: int, stop: int) -> list[float]:
    """Steps ``start`` … ``stop - 1``, skipping the batches of the current epoch that ran before ``start``."""
    losses: list[float] = []
    batches_per_epoch = len(loader)
    step = start
    while step < stop:
        epoch, done_in_epoch = divmod(step, batches_per_epoch)
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch else loader
        for batch in epoch_loader:
            model.train()
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            if step == stop:
                break
    return losses


def test_prepare_wraps_the_learned_optimizer(descending: str) -> None:
    accelerator, model, optimizer, loader = setup(descending)
    assert isinstance(optimizer, AcceleratedOptimizer) and isinstance(optimizer.optimizer, LearnedOptimizer)
    losses = train(accelerator, model, optimizer, loader, 0, 8)
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-2:]) < 0.95 * sum(losses[:2])
    stats = optimizer.optimizer.last_step_stats()
    assert stats["update_rms"] > 0 and stats["skipped_nonfinite_tensors"] == 0


def test_save_state_load_state_resumes_identically(descending: str, tmp_path: Path) -> None:
    uninterrupted = train(*setup(descending), 0, TOTAL_STEPS)

    accelerator, model, optimizer, loader = setup(descending)
    first_half = train(accelerator, model, optimizer, loader, 0, SAVE_AT)
    accelerator.save_state(str(tmp_path / "state"))  # optimizer.bin: torch.save, loaded back with weights_only=True
    assert first_half == uninterrupted[:SAVE_AT]

    accelerator, model, optimizer, loader = setup(descending, model_seed=1)  # fresh objects, other init
    accelerator.load_state(str(tmp_path / "state"))
    assert optimizer.optimizer.total_steps == TOTAL_STEPS
    assert all(optimizer.state[p]["step"] == SAVE_AT for p in model.parameters())
    second_half = train(accelerator, model, optimizer, loader, SAVE_AT, TOTAL_STEPS)
    assert second_half == uninterrupted[SAVE_AT:]
