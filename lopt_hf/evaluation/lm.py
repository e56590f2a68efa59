"""A tiny character-level language-modelling task: public-domain text, a small GPT-2, ``transformers.Trainer``.

Shared by ``scripts/finetune.py`` (learned optimizer vs AdamW, one run each) and the ``tiny_lm``
task of ``lopt-hf eval``. Nothing is downloaded: the text is embedded below and the model is built
from a ``GPT2Config``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

# Public-domain text: the Gettysburg Address (Lincoln, 1863), the opening paragraphs of "A Tale of
# Two Cities" (Dickens, 1859) and "Pride and Prejudice" (Austen, 1813), and the preamble of the
# Declaration of Independence (1776).
DEFAULT_TEXT = """\
Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in Liberty, \
and dedicated to the proposition that all men are created equal. Now we are engaged in a great civil war, testing \
whether that nation, or any nation so conceived and so dedicated, can long endure. We are met on a great \
battle-field of that war. We have come to dedicate a portion of that field, as a final resting place for those who \
here gave their lives that that nation might live. It is altogether fitting and proper that we should do this. \
But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this ground. The brave \
men, living and dead, who struggled here, have consecrated it, far above our poor power to add or detract. The \
world will little note, nor long remember what we say here, but it can never forget what they did here. It is for \
us the living, rather, to be dedicated here to the unfinished work which they who fought here have thus far so \
nobly advanced. It is rather for us to be here dedicated to the great task remaining before us -- that from these \
honored dead we take increased devotion to that cause for which they gave the last full measure of devotion -- \
that we here highly resolve that these dead shall not have died in vain -- that this nation, under God, shall have \
a new birth of freedom -- and that government of the people, by the people, for the people, shall not perish from \
the earth.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, it \
was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of \
Darkness, it was the spring of hope, it was the winter of despair, we had everything before us, we had nothing \
before us, we were all going direct to Heaven, we were all going direct the other way -- in short, the period was \
so far like the present period, that some of its noisiest authorities insisted on its being received, for good or \
for evil, in the superlative degree of comparison only.
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a \
wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, this \
truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property of \
some one or other of their daughters.
When in the Course of human events, it becomes necessary for one people to dissolve the political bands which \
have connected them with another, and to assume among the powers of the earth, the separate and equal station to \
which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of mankind requires \
that they should declare the causes which impel them to the separation. We hold these truths to be self-evident, \
that all men are created equal, that they are endowed by their Creator with certain unalienable Rights, that \
among these are Life, Liberty and the pursuit of Happiness.
"""


class CharBlocks(Dataset):
    """Overlapping windows of ``block_size`` character ids (stride ``block_size // 2``); labels = inputs."""

    def __init__(self, ids: Tensor, block_size: int) -> None:
        if len(ids) < block_size:
            raise ValueError(f"{len(ids)} characters are fewer than one block of {block_size}")
        stride = max(1, block_size // 2)
        starts = range(0, len(ids) - block_size + 1, stride)
        self.blocks = torch.stack([ids[start:start + block_size] for start in starts])

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def make_char_data(text: str, block_size: int, eval_fraction: float = 0.1) -> tuple[int, CharBlocks, CharBlocks]:
    """Character vocabulary size, then train / held-out blocks (the held-out part is the end of the text)."""
    vocab = sorted(set(text))
    index = {char: position for position, char in enumerate(vocab)}
    ids = torch.tensor([index[char] for char in text])
    split = int(len(ids) * (1 - eval_fraction))
    return len(vocab), CharBlocks(ids[:split], block_size), CharBlocks(ids[split:], block_size)


def make_char_gpt2(vocab_size: int, block_size: int, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                   dropout: float = 0.1, seed: int = 0) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 for ``vocab_size`` characters (or tokens) and contexts of ``block_size``.

    The one tiny GPT-2 of lopt_hf: the ``tiny_lm`` task, ``scripts/finetune.py``,
    ``scripts/bench_trainer.py`` and the integration tests build it here. ``dropout`` is the residual,
    embedding and attention dropout (GPT-2's default 0.1). The initialisation depends only on
    ``seed``; the caller's global torch RNG is left as it was.
    """
    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    # transformers infers the loss type from the class name, which "GPT2LMHeadModel" does not spell. Left
    # unset, the loss function is the same (after a warning) but Trainer then counts all 64 labels of a
    # block instead of the 63 predicted ones, and logs training losses 1.6% too low.
    model.loss_type = "ForCausalLM"
    return model


def trainer_arguments(output_dir: str | os.PathLike[str], *, steps: int, batch_size: int, seed: int,
                      **overrides: Any) -> TrainingArguments:
    """CPU ``TrainingArguments`` that log the training loss at every step and save nothing.

    Non-finite losses are logged as they are (``logging_nan_inf_filter=False``), not replaced by
    the running mean.
    """
    settings: dict[str, Any] = dict(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                                    per_device_eval_batch_size=64, logging_steps=1, logging_nan_inf_filter=False,
                                    save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                                    disable_tqdm=True, seed=seed)
    settings.update(overrides)
    return TrainingArguments(**settings)


def logged_losses(trainer: Trainer) -> list[float]:
    """The training loss of every logged step (``logging_steps=1``: one per optimizer step)."""
    return [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


class StopOnNonFiniteLoss(TrainerCallback):
    """Stop training after the first logged training loss that is NaN or infinite."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs and not math.isfinite(float(logs["loss"])):
            control.should_training_stop = True


@torch.no_grad()
def evaluate_char_lm(model: torch.nn.Module, dataset: CharBlocks, batch_size: int = 64) -> tuple[float, float]:
    """Held-out ``(loss, next-character accuracy)`` over every predicted position of ``dataset``.

    The loss is what ``Trainer.evaluate`` reports as ``eval_loss`` when the set fits one batch
    (the mean cross-entropy of each next character); accuracy is the share of positions whose
    most likely next character is the right one.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for start in range(0, len(dataset.blocks), batch_size):
            blocks = dataset.blocks[start:start + batch_size].to(next(model.parameters()).device)
            logits = model(input_ids=blocks).logits[:, :-1].float()
            targets = blocks[:, 1:]
            total_loss += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                  targets.reshape(-1), reduction="sum"))
            correct += int((logits.argmax(dim=-1) == targets).sum())
            count += targets.numel()
    finally:
        model.train(was_training)
    return total_loss / count, correct / count
