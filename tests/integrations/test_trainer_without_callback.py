"""A learned optimizer in a real ``transformers.Trainer`` without ``LearnedOptimizerCallback`` (issue 19, hole 9).

The optimizer finds the Trainer that steps it and warns once that the callback is missing (it sets the
planned number of steps and logs statistics), saying what Trainer's schedule and clipping do to the learned
step — Trainer's defaults decay it to 0 (``lr_scheduler_type="linear"``) and clip gradients at 1.0. Nothing
comes from the optimizer when the callback is there, or outside Trainer.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from support import tiny_gpt2, training_args
from transformers import Trainer, TrainingArguments

from lopt_hf import LearnedOptimizerCallback, load_lopt, trainer_optimizer
from lopt_hf.optim import LearnedOptimizerSettingsWarning
from lopt_hf.trainer import unwrap_optimizer

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def default_args(output_dir) -> TrainingArguments:
    """Trainer's defaults (linear decay to 0, max_grad_norm=1.0), only made quick, quiet and CPU-bound."""
    return TrainingArguments(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=8, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True, seed=0)


def make_trainer(entry: str, artifact: str, args, dataset, vocab_size: int, **kwargs) -> Trainer:
    model = tiny_gpt2(vocab_size)
    if entry == "optimizers":
        return Trainer(model=model, args=args, train_dataset=dataset, optimizers=(load_lopt(artifact, model), None),
                       **kwargs)
    return Trainer(model=model, args=args, train_dataset=dataset, optimizer_cls_and_kwargs=trainer_optimizer(artifact),
                   **kwargs)


CALLBACK_MISSING = "stepped by transformers.Trainer without lopt_hf.LearnedOptimizerCallback"


@pytest.mark.parametrize("entry", ["optimizers", "optimizer_cls_and_kwargs"])
def test_default_settings_without_the_callback_warn_once(entry: str, descending: str, lm, tmp_path) -> None:
    tokenizer, dataset = lm
    trainer = make_trainer(entry, descending, default_args(tmp_path), dataset, tokenizer.vocab_size)
    with pytest.warns(LearnedOptimizerSettingsWarning) as record:
        trainer.train()
    assert len(record) == 1  # once, not once per step
    message = str(record[0].message)
    for expected in (CALLBACK_MISSING, "sets the planned number of steps",
                     "the LR scheduler (lr_scheduler_type=linear, no warmup) multiplies the learned step by ×1 at "
                     "step 0, falling to ×0.25 at step 3 (the last)",
                     "max_grad_norm=1.0 clips the global gradient norm"):
        assert expected in message, message
    assert record[0].filename == __file__  # the trainer.train() line above, not Trainer's optimizer.step()
    # what it said did happen: the learned step was decayed to 0 by the end
    assert unwrap_optimizer(trainer.optimizer).param_groups[0]["lr"] == 0.0


def test_only_the_settings_that_apply_are_named(descending: str, lm, tmp_path) -> None:
    tokenizer, dataset = lm
    args = training_args(tmp_path, max_steps=2, max_grad_norm=0.5)  # constant schedule, clipping at 0.5
    trainer = make_trainer("optimizers", descending, args, dataset, tokenizer.vocab_size)
    with pytest.warns(LearnedOptimizerSettingsWarning) as record:
        trainer.train()
    message = str(record[0].message)
    assert "max_grad_norm=0.5" in message and "lr_scheduler_type" not in message, message


@pytest.mark.parametrize("attach", [False, True])
def test_no_optimizer_warning_with_the_callback(attach: bool, descending: str, lm, tmp_path) -> None:
    """With the callback the optimizer stays quiet: the callback's own warning (once) is the only one."""
    tokenizer, dataset = lm
    trainer = make_trainer("optimizers", descending, default_args(tmp_path), dataset, tokenizer.vocab_size,
                           callbacks=[] if attach else [LearnedOptimizerCallback()])
    if attach:
        LearnedOptimizerCallback.attach(trainer)
    with pytest.warns(LearnedOptimizerSettingsWarning) as record:
        trainer.train()  # Trainer's default learning_rate=5e-5 is not used: the callback says so
    assert len(record) == 1
    assert str(record[0].message).startswith("Trainer settings change what the learned optimizer does")
    assert unwrap_optimizer(trainer.optimizer).settings_checked


def test_settings_that_leave_the_step_alone_name_only_the_callback(descending: str, lm, tmp_path) -> None:
    """Constant schedule, no clipping: the warning is about the missing callback alone."""
    tokenizer, dataset = lm
    args = training_args(tmp_path, max_steps=2, lr_scheduler_type="constant", max_grad_norm=0.0)
    with pytest.warns(LearnedOptimizerSettingsWarning) as record:
        make_trainer("optimizers", descending, args, dataset, tokenizer.vocab_size).train()
    assert len(record) == 1
    message = str(record[0].message)
    assert CALLBACK_MISSING in message and "what Trainer does" not in message, message


def test_no_warning_outside_trainer(descending: str, lm) -> None:
    """A plain loop with an LR scheduler is the user's own choice: nothing to find, nothing said."""
    tokenizer, dataset = lm
    with warnings.catch_warnings():
        warnings.simplefilter("error", LearnedOptimizerSettingsWarning)
        model = tiny_gpt2(tokenizer.vocab_size)
        optimizer = load_lopt(descending, model)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=2)
        for index in range(2):
            batch = dataset[index]
            model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
            optimizer.step()
            scheduler.step()
        assert optimizer.settings_checked
