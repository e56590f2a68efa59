"""A learned optimizer in a real ``transformers.Trainer`` without ``LearnedOptimizerCallback`` (issue 19, hole 9).

Trainer's defaults decay the learned step to 0 (``lr_scheduler_type="linear"``) and clip gradients at 1.0:
the optimizer finds the Trainer that steps it and warns once; nothing warns when the callback is there, when
the settings are the recommended ones, or outside Trainer.
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


@pytest.mark.parametrize("entry", ["optimizers", "optimizer_cls_and_kwargs"])
def test_default_settings_without_the_callback_warn_once(entry: str, descending: str, lm, tmp_path) -> None:
    tokenizer, dataset = lm
    trainer = make_trainer(entry, descending, default_args(tmp_path), dataset, tokenizer.vocab_size)
    with pytest.warns(LearnedOptimizerSettingsWarning) as record:
        trainer.train()
    assert len(record) == 1  # once, not once per step
    message = str(record[0].message)
    for expected in ("without lopt_hf.LearnedOptimizerCallback", "lr_scheduler_type=linear",
                     "factors from 0.25 to 1 over 4 steps", "max_grad_norm=1.0 clips the gradients",
                     "lr_scheduler_type='constant', max_grad_norm=0"):
        assert expected in message, message
    assert record[0].filename.endswith("transformers/trainer.py")  # it points at Trainer's optimizer.step()
    # what it warned about did happen: the learned step was decayed to 0 by the end
    assert unwrap_optimizer(trainer.optimizer).param_groups[0]["lr"] == 0.0


def test_only_the_settings_that_apply_are_named(descending: str, lm, tmp_path) -> None:
    tokenizer, dataset = lm
    args = training_args(tmp_path, max_steps=2, max_grad_norm=0.5)  # constant schedule, clipping at 0.5
    trainer = make_trainer("optimizers", descending, args, dataset, tokenizer.vocab_size)
    with pytest.warns(LearnedOptimizerSettingsWarning) as record:
        trainer.train()
    message = str(record[0].message)
    assert "max_grad_norm=0.5" in message and "scheduler" not in message.split("\n(")[0], message


@pytest.mark.parametrize("attach", [False, True])
def test_no_optimizer_warning_with_the_callback(attach: bool, descending: str, lm, tmp_path) -> None:
    """With the callback the optimizer stays quiet: the callback's own warning (once, fuller) is the only one."""
    tokenizer, dataset = lm
    trainer = make_trainer("optimizers", descending, default_args(tmp_path), dataset, tokenizer.vocab_size,
                           callbacks=[] if attach else [LearnedOptimizerCallback()])
    if attach:
        LearnedOptimizerCallback.attach(trainer)
    with pytest.warns(LearnedOptimizerSettingsWarning) as record:
        trainer.train()
    assert len(record) == 1
    assert str(record[0].message).startswith("Trainer settings change what the learned optimizer does")
    assert unwrap_optimizer(trainer.optimizer).settings_checked


def test_no_warning_with_the_recommended_settings_or_outside_trainer(descending: str, lm, tmp_path) -> None:
    tokenizer, dataset = lm
    with warnings.catch_warnings():
        warnings.simplefilter("error", LearnedOptimizerSettingsWarning)
        make_trainer("optimizers", descending, training_args(tmp_path, max_steps=2), dataset,
                     tokenizer.vocab_size).train()
        # a plain loop with an LR scheduler is the user's own choice: nothing to find, nothing said
        model = tiny_gpt2(tokenizer.vocab_size)
        optimizer = load_lopt(descending, model)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=2)
        for index in range(2):
            batch = dataset[index]
            model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
            optimizer.step()
            scheduler.step()
        assert optimizer.settings_checked
