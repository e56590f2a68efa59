"""transformers.Trainer with a scheduled rule (published Celo): loss and planned steps reach the
scheduler on every step (accumulation included), exact resume, a clear error without the callback, and a
warning when Trainer's LR schedule multiplies the schedule the rule learned."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from support import load_refvectors, subtree, tiny_gpt2, train_losses, training_args
from transformers import Trainer

from lopt_hf import LearnedOptimizerCallback, create_artifact, load_lopt, trainer_optimizer
from lopt_hf.kernels.compiled import CompiledKernel
from lopt_hf.optim import SCHEDULE_KEY, LearnedOptimizerSettingsWarning
from lopt_hf.rules.scheduler import LossBuffer
from lopt_hf.trainer import unwrap_optimizer

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def published_celo(tmp_path_factory) -> str:
    """The authors' published Celo weights (MIT) as a lopt_hf artifact folder."""
    folder = tmp_path_factory.mktemp("celo") / "celo"
    theta = subtree(load_refvectors("celo_published"), "theta")
    create_artifact("celo", theta=theta, optimizer_defaults={"lr": 1.0, "weight_decay": 0.0}).save_pretrained(folder)
    return str(folder)



def replayed_buffer(losses: list[float], num_steps: int) -> dict[str, torch.Tensor]:
    state = LossBuffer.init(num_steps)
    for iteration, loss in enumerate(losses):
        state = LossBuffer.update(state, torch.tensor(loss), torch.tensor(float(iteration)))
    return state


def test_scheduler_sees_every_step_loss_and_the_planned_steps(published_celo: str, lm, tmp_path) -> None:
    tokenizer, dataset = lm
    model = tiny_gpt2(tokenizer.vocab_size)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=6, gradient_accumulation_steps=2),
                      train_dataset=dataset, optimizers=(load_lopt(published_celo, model), None))
    LearnedOptimizerCallback.attach(trainer)
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    schedule = unwrap_optimizer(trainer.optimizer).state[SCHEDULE_KEY]
    assert float(schedule["iteration"]) == 6 and float(schedule["num_steps"]) == 6  # Trainer's max_steps
    expected = replayed_buffer(losses, 6)  # the logged losses, rounded
    torch.testing.assert_close(schedule["loss_means"], expected["loss_means"], rtol=1e-3, atol=1e-4)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_resume_from_a_trainer_checkpoint_is_exact(published_celo: str, compile: bool, lm, tmp_path) -> None:
    """Also with ``compile=True``: the compiled step is deterministic and its state is the eager one's."""
    tokenizer, dataset = lm
    args = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4}

    def run(output: str, seed: int, resume: str | None = None) -> Trainer:
        model = tiny_gpt2(tokenizer.vocab_size, seed=seed)
        trainer = Trainer(model=model, args=training_args(tmp_path / output, **args), train_dataset=dataset,
                          optimizer_cls_and_kwargs=trainer_optimizer(published_celo, compile=compile))
        LearnedOptimizerCallback.attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    first = run("run", seed=0)
    kernel = unwrap_optimizer(first.optimizer).kernel_on(torch.device("cpu"))
    assert isinstance(kernel, CompiledKernel) == compile and not (kernel.compiler is not None and kernel.compiler.failed)
    resumed = run("resumed", seed=1, resume=str(tmp_path / "run" / "checkpoint-4"))  # the checkpoint must win
    assert train_losses(resumed)[4:] == train_losses(first)[4:]
    for a, b in zip(first.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    schedules = [unwrap_optimizer(t.optimizer).state[SCHEDULE_KEY] for t in (first, resumed)]
    assert all(torch.equal(schedules[0][key], schedules[1][key]) for key in schedules[0])


def test_without_attach_the_error_says_how(published_celo: str, lm, tmp_path) -> None:
    tokenizer, dataset = lm
    model = tiny_gpt2(tokenizer.vocab_size)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=dataset,
                      optimizers=(load_lopt(published_celo, model), None), callbacks=[LearnedOptimizerCallback()])
    with pytest.raises(RuntimeError, match="attach"):
        trainer.train()


def test_a_decaying_trainer_schedule_is_a_warning_for_a_scheduled_rule(published_celo: str, lm, tmp_path) -> None:
    """Linear decay (recommended for rules without a learned schedule) multiplies Celo's own annealing: warned;
    the constant schedule is not."""
    tokenizer, dataset = lm

    def trainer(lr_scheduler_type: str, output: str) -> Trainer:
        model = tiny_gpt2(tokenizer.vocab_size)
        args = training_args(tmp_path / output, max_steps=2, lr_scheduler_type=lr_scheduler_type, max_grad_norm=0.0)
        built = Trainer(model=model, args=args, train_dataset=dataset,
                        optimizers=(load_lopt(published_celo, model), None))
        LearnedOptimizerCallback.attach(built)
        return built

    linear = trainer("linear", "linear")
    assert linear.optimizer.rule.scheduled
    with pytest.warns(LearnedOptimizerSettingsWarning) as record:
        linear.train()
    assert len(record) == 1 and record[0].filename == __file__
    message = str(record[0].message)
    for expected in ("lr_scheduler_type=linear, no warmup) multiplies the learned step by ×1 at step 0, falling to "
                     "×0.5 at step 1 (the last)", "on top of the schedule rule 'celo' learned",
                     "use lr_scheduler_type='constant' for it"):
        assert expected in message, message
    with warnings.catch_warnings():
        warnings.simplefilter("error", LearnedOptimizerSettingsWarning)
        trainer("constant", "constant").train()
