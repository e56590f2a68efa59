"""transformers.Trainer with learned optimizers: both entry points, the callback, checkpoints, accumulation, bf16."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from support import DigitTokens, tiny_bert_classifier, tiny_gpt2, train_losses, training_args
from transformers import Trainer

import lopt_hf
from lopt_hf import LearnedOptimizer, LearnedOptimizerCallback, create_artifact, load_lopt, trainer_optimizer
from lopt_hf.optim import ADAMW_ROUTE, ROUTE_KEY
from lopt_hf.trainer import LearnedOptimizerFactory, LearnedOptimizerSettingsWarning, unwrap_optimizer

pytestmark = pytest.mark.usefixtures("single_torch_thread")




def decreased(losses: list[float]) -> bool:
    return all(math.isfinite(loss) for loss in losses) and sum(losses[-2:]) / 2 < 0.95 * sum(losses[:2]) / 2


def run_entry_point(entry: str, artifact, model, args, dataset, **trainer_kwargs) -> Trainer:
    if entry == "optimizers":
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          optimizers=(load_lopt(artifact, model), None), **trainer_kwargs)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          optimizer_cls_and_kwargs=trainer_optimizer(artifact), **trainer_kwargs)
    trainer.train()
    return trainer


@pytest.mark.parametrize("task", ["gpt2_lm", "bert_digits"])
def test_both_entry_points_train_the_same(task: str, descending: str, lm, tmp_path) -> None:
    if task == "gpt2_lm":
        tokenizer, dataset = lm
        make_model = lambda: tiny_gpt2(tokenizer.vocab_size)  # noqa: E731
    else:
        dataset = DigitTokens(limit=256)
        make_model = tiny_bert_classifier
    losses = {}
    for entry in ("optimizers", "optimizer_cls_and_kwargs"):
        model = make_model()
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        with warnings.catch_warnings():
            warnings.simplefilter("error", LearnedOptimizerSettingsWarning)  # recommended settings: no warning
            trainer = run_entry_point(entry, descending, model, training_args(tmp_path / entry), dataset,
                                      callbacks=[LearnedOptimizerCallback()])
        optimizer = unwrap_optimizer(trainer.optimizer)
        assert isinstance(optimizer, LearnedOptimizer)
        assert optimizer.param_groups[0]["lr"] == 1.0  # the artifact's lr, not a Trainer learning rate
        assert optimizer.total_steps == 8  # set by the callback from state.max_steps
        # Every tensor went through the learned rule at every step and moved.
        assert all(optimizer.state[p]["step"] == 8 for p in model.parameters())
        unmoved = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
        # (a key bias adds the same q·b to every attention score: softmax ignores it, its gradient is 0)
        assert all(name.endswith("attention.self.key.bias") for name in unmoved), unmoved
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert len(logged) == 8
        assert all(entry["lopt/update_rms"] > 0 and entry["lopt/skipped_nonfinite"] == 0 for entry in logged)
        losses[entry] = train_losses(trainer)
        assert all(math.isfinite(loss) for loss in losses[entry])
    assert losses["optimizers"] == losses["optimizer_cls_and_kwargs"]  # the same optimizer, built either way
    if task == "gpt2_lm":
        # (tiny post-LN BERT sits on its 2.30 plateau for dozens of steps with any optimizer, AdamW included)
        assert decreased(losses["optimizers"]), losses


def test_factory_builds_from_the_whole_model(lm, tmp_path) -> None:
    """The factory gets the model: a harness sends GPT-2's embeddings (found by module type) to AdamW."""
    tokenizer, dataset = lm
    artifact = create_artifact("small_fc_lopt", seed=0, harness={"type": "celo2"})
    model = tiny_gpt2(tokenizer.vocab_size)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=3, learning_rate=0.5), train_dataset=dataset,
                      optimizer_cls_and_kwargs=trainer_optimizer(artifact, lr=0.5),
                      callbacks=[LearnedOptimizerCallback()])
    trainer.train()
    optimizer = unwrap_optimizer(trainer.optimizer)
    adamw = {id(p) for g in optimizer.param_groups if g[ROUTE_KEY] == ADAMW_ROUTE for p in g["params"]}
    assert id(model.transformer.wte.weight) in adamw and id(model.transformer.wpe.weight) in adamw
    assert id(model.transformer.h[0].attn.c_attn.weight) not in adamw
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.5 * 20.0]  # lr override; AdamW group lr·mult_1d
    logged = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    assert logged["lopt/update_rms"] > 0 and logged["lopt/update_rms_adamw"] > 0


def test_factory_called_the_old_way_with_param_groups(descending: str) -> None:
    """Trainers that call ``optimizer_cls(param_groups, **kwargs)`` still get a LearnedOptimizer."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    factory, kwargs = trainer_optimizer(descending)
    groups = [{"params": [model[0].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, *model[1].parameters()], "weight_decay": 0.0}]
    optimizer = factory(groups, **kwargs)
    assert isinstance(optimizer, LearnedOptimizer)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert isinstance(LearnedOptimizerFactory(), LearnedOptimizerFactory)
    with pytest.raises(TypeError, match="trainer_optimizer"):
        LearnedOptimizerFactory()(model)
    with pytest.raises(TypeError, match="unknown keyword"):
        trainer_optimizer(descending, betas=(0.9, 0.99))


def test_callback_warns_once_about_mistakes_and_notes_schedule_and_clipping(descending: str, lm, tmp_path,
                                                                           caplog) -> None:
    """Unused learning_rate / weight_decay are warned about; for a rule without a learned schedule, the LR
    schedule and the clipping are choices: an INFO note says what they do, the warning does not list them."""
    tokenizer, dataset = lm
    model = tiny_gpt2(tokenizer.vocab_size)
    # Trainer's defaults: linear decay to 0, max_grad_norm=1.0, learning_rate=5e-5; plus weight decay.
    args = training_args(tmp_path, max_steps=4, lr_scheduler_type="linear", max_grad_norm=1.0, learning_rate=5e-5,
                         weight_decay=0.01)
    callback = LearnedOptimizerCallback()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback],
                      optimizer_cls_and_kwargs=trainer_optimizer(descending))
    with caplog.at_level(logging.INFO, logger="lopt_hf.trainer"), \
            pytest.warns(LearnedOptimizerSettingsWarning) as record:
        trainer.train()
    assert len(record) == 1
    message = str(record[0].message)
    for expected in ("learning_rate=5e-05 is not used", "weight_decay=0.01 is not used"):
        assert expected in message, message
    assert "lr_scheduler_type" not in message and "max_grad_norm" not in message, message
    assert record[0].filename == __file__  # the trainer.train() line above, not transformers' callback dispatch
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Trainer settings for the learned")]
    assert len(notes) == 1, notes
    for expected in ("the LR scheduler (lr_scheduler_type=linear, no warmup) multiplies the learned step by ×1 at "
                     "step 0, falling to ×0.25 at step 3 (the last)",
                     "max_grad_norm=1.0 clips the global gradient norm"):
        assert expected in notes[0], notes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", LearnedOptimizerSettingsWarning)
        trainer.train()  # warned once per callback


def test_recommended_settings_raise_no_warning(descending: str, lm, tmp_path, caplog) -> None:
    """Linear decay, no warmup, no clipping (the README's recommendation for rules without a learned schedule)."""
    tokenizer, dataset = lm
    model = tiny_gpt2(tokenizer.vocab_size)
    args = training_args(tmp_path, max_steps=4, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[LearnedOptimizerCallback()],
                      optimizers=(load_lopt(descending, model), None))
    assert not trainer.optimizer.rule.scheduled
    with caplog.at_level(logging.INFO, logger="lopt_hf.trainer"), warnings.catch_warnings():
        warnings.simplefilter("error", LearnedOptimizerSettingsWarning)
        trainer.train()
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Trainer settings for the learned")]
    assert len(notes) == 1 and "falling to ×0.25 at step 3 (the last)" in notes[0], notes
    assert "max_grad_norm" not in notes[0]
    assert unwrap_optimizer(trainer.optimizer).param_groups[0]["lr"] == 0.0  # the decay did run


def test_schedule_is_described_from_every_step() -> None:
    """The peak after a warmup and the last step's multiplier are the real ones, not those of a few samples."""
    from transformers import get_scheduler

    from lopt_hf.lr_schedules import describe_schedule

    def schedule(kind: str, warmup: int, steps: int = 200):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=steps)

    assert describe_schedule(schedule("cosine", 20), 200) == ("×0 at step 0, rising to ×1 at step 20, then falling "
                                                              "to ×7.6e-05 at step 199 (the last)")
    assert describe_schedule(schedule("constant_with_warmup", 20), 200) == "×0 at step 0, rising to ×1 at step 20"
    assert describe_schedule(schedule("constant", 0), 200) == ""
    assert describe_schedule(schedule("linear", 1000, 100_000), 100_000).endswith("×1e-05 at step 99999 (the last)")
    assert describe_schedule(None, 200) is None


def test_callback_flags_an_adamw_sized_learning_rate(descending: str, lm, tmp_path) -> None:
    tokenizer, dataset = lm
    model = tiny_gpt2(tokenizer.vocab_size)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2, learning_rate=5e-5),
                      train_dataset=dataset, optimizers=(load_lopt(descending, model, lr=5e-5), None),
                      callbacks=[LearnedOptimizerCallback()])
    with pytest.warns(LearnedOptimizerSettingsWarning, match=r"lr is 5e-05, 2e\+04x smaller than the artifact's 1"):
        trainer.train()


def test_callback_attach_puts_it_first(descending: str, lm, tmp_path) -> None:
    tokenizer, dataset = lm
    model = tiny_gpt2(tokenizer.vocab_size)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=dataset,
                      optimizers=(load_lopt(descending, model), None))
    callback = LearnedOptimizerCallback.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    assert "lopt/update_rms" in trainer.state.log_history[0]


def test_nonfinite_gradient_is_skipped_and_logged(descending: str, lm, tmp_path) -> None:
    """A NaN gradient in one tensor at step 3: no NaN reaches a parameter, every skipped tensor is counted and logged.

    How far one NaN spreads before the optimizer sees it is the Trainer's business, not ours: up to
    accelerate 1.15 its gradient-norm computation (``clip_grad_norm_(params, inf)``, run even with
    ``max_grad_norm=0``) multiplied *every* gradient by ``inf / nan = nan``; from 1.16 only the poisoned
    tensor is non-finite. So the test observes, at each ``optimizer.step``, which gradients are
    non-finite, and checks our promise against that: exactly those tensors are skipped (left bit-for-bit
    unchanged, their step count not advanced), the others are updated, the log counts every skip.
    """
    tokenizer, dataset = lm
    model = tiny_gpt2(tokenizer.vocab_size)
    target = model.transformer.h[1].mlp.c_fc.weight
    backward_calls = []

    def poison(grad: torch.Tensor) -> torch.Tensor:
        backward_calls.append(1)
        return torch.full_like(grad, float("nan")) if len(backward_calls) == 3 else grad

    target.register_hook(poison)
    optimizer = load_lopt(descending, model)
    params = list(model.parameters())
    nonfinite_per_step: list[set[int]] = []
    before: list[torch.Tensor] = []

    def observe_gradients(opt, args, kwargs) -> None:
        nonfinite_per_step.append({i for i, p in enumerate(params)
                                   if p.grad is not None and not torch.isfinite(p.grad).all()})
        before[:] = [p.detach().clone() for p in params]

    def check_skipped_tensors_unchanged(opt, args, kwargs) -> None:
        for i, p in enumerate(params):
            assert torch.isfinite(p).all(), f"non-finite value reached parameter {i}"
            if i in nonfinite_per_step[-1]:
                assert torch.equal(p, before[i]), f"parameter {i} changed although its gradient was non-finite"

    optimizer.register_step_pre_hook(observe_gradients)
    optimizer.register_step_post_hook(check_skipped_tensors_unchanged)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=5), train_dataset=dataset,
                      optimizers=(optimizer, None), callbacks=[LearnedOptimizerCallback()])
    trainer.train()

    assert len(nonfinite_per_step) == 5
    target_index = next(i for i, p in enumerate(params) if p is target)
    assert target_index in nonfinite_per_step[2]  # the poisoned tensor, maybe more (older accelerate)
    assert all(not bad for step, bad in enumerate(nonfinite_per_step) if step != 2)
    logged = [entry["lopt/skipped_nonfinite"] for entry in trainer.state.log_history if "loss" in entry]
    expected = [sum(len(bad) for bad in nonfinite_per_step[:step + 1]) for step in range(5)]
    assert logged == expected
    assert optimizer.num_skipped_nonfinite == expected[-1]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = unwrap_optimizer(trainer.optimizer).state
    assert all(state[p]["step"] == 5 - (i in nonfinite_per_step[2]) for i, p in enumerate(params))
    assert all(math.isfinite(loss) for loss in train_losses(trainer))


def test_resume_from_checkpoint_matches_an_uninterrupted_run(descending: str, lm, tmp_path) -> None:
    """optimizer.pt (torch.save, loaded with weights_only=True), RNG state and data order: exact continuation."""
    tokenizer, dataset = lm
    args = {"max_steps": 10, "save_strategy": "steps", "save_steps": 5}  # dropout on: the RNG state matters too
    first = Trainer(model=tiny_gpt2(tokenizer.vocab_size), args=training_args(tmp_path / "run", **args),
                    train_dataset=dataset, optimizer_cls_and_kwargs=trainer_optimizer(descending),
                    callbacks=[LearnedOptimizerCallback()])
    first.train()
    uninterrupted = train_losses(first)

    checkpoint = tmp_path / "run" / "checkpoint-5"
    assert (checkpoint / "optimizer.pt").is_file()
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert state["param_groups"][0]["total_steps"] == 10
    resumed = Trainer(model=tiny_gpt2(tokenizer.vocab_size, seed=1),  # different init: the checkpoint must win
                      args=training_args(tmp_path / "resumed", **args), train_dataset=dataset,
                      optimizer_cls_and_kwargs=trainer_optimizer(descending), callbacks=[LearnedOptimizerCallback()])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    continued = train_losses(resumed)
    assert len(uninterrupted) == 10 and len(continued) == 10  # the resumed history starts with the saved 5
    assert continued[5:] == uninterrupted[5:]
    optimizer = unwrap_optimizer(resumed.optimizer)
    assert all(optimizer.state[p]["step"] == 10 for p in resumed.model.parameters())


def test_gradient_accumulation(descending: str, lm, tmp_path) -> None:
    tokenizer, dataset = lm
    model = tiny_gpt2(tokenizer.vocab_size)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=8, per_device_train_batch_size=4,
                                                      gradient_accumulation_steps=2),
                      train_dataset=dataset, optimizers=(load_lopt(descending, model), None),
                      callbacks=[LearnedOptimizerCallback()])
    trainer.train()
    optimizer = unwrap_optimizer(trainer.optimizer)
    assert all(optimizer.state[p]["step"] == 8 for p in model.parameters())  # one step per 2 micro-batches
    assert decreased(train_losses(trainer)), train_losses(trainer)


def test_bf16_autocast_on_cpu(descending: str, lm, tmp_path) -> None:
    tokenizer, dataset = lm
    model = tiny_gpt2(tokenizer.vocab_size)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=8, bf16=True), train_dataset=dataset,
                      optimizer_cls_and_kwargs=trainer_optimizer(descending), callbacks=[LearnedOptimizerCallback()])
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: fp32 master weights
    losses = train_losses(trainer)
    assert decreased(losses), losses


def test_public_api_exports() -> None:
    assert lopt_hf.trainer_optimizer is trainer_optimizer
    assert lopt_hf.LearnedOptimizerCallback is LearnedOptimizerCallback


# ------------------------------------------------------------------ LearnedOptimizer pieces the integration uses


def test_set_total_steps_is_saved_with_the_state(descending: str, tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = load_lopt(descending, model)
    assert optimizer.total_steps is None
    optimizer.set_total_steps(120)
    assert optimizer.total_steps == 120 and all(g["total_steps"] == 120 for g in optimizer.param_groups)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    restored = load_lopt(descending, model)
    restored.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert restored.total_steps == 120
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="total_steps"):
            optimizer.set_total_steps(bad)
    optimizer.set_total_steps(None)
    assert optimizer.total_steps is None


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_last_step_stats_measure_the_applied_update(weight_decay: float) -> None:
    """update_rms is the RMS of new − old over the learned route; AdamW-routed tensors are reported apart."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3))
    artifact = create_artifact("small_fc_lopt", seed=0, harness={"type": "celo2"})
    optimizer = load_lopt(artifact, model, lr=0.5, weight_decay=weight_decay)
    assert optimizer.last_step_stats() == {}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(torch.tensor([0, 3, 4])).pow(2).sum().backward()
    optimizer.step()
    changes = {name: p.detach() - before[name] for name, p in model.named_parameters()}
    learned = changes["1.weight"]  # the only matrix that is not an embedding and has > 1 dim
    adamw = torch.cat([changes[name].reshape(-1) for name in ("0.weight", "1.bias")])
    stats = optimizer.last_step_stats()
    assert stats["update_rms"] == pytest.approx(float(learned.pow(2).mean().sqrt()), rel=1e-4)
    assert stats["update_rms_adamw"] == pytest.approx(float(adamw.pow(2).mean().sqrt()), rel=1e-4)
    assert stats["updated_tensors"] == 3 and stats["skipped_nonfinite_tensors"] == 0

    optimizer.zero_grad()
    model(torch.tensor([1])).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")
    optimizer.step()
    stats = optimizer.last_step_stats()
    assert "update_rms" not in stats and stats["skipped_nonfinite_tensors"] == 1
    assert optimizer.num_skipped_nonfinite == 1


def test_loss_needing_rule_gets_each_batch_loss_in_trainer(lm, tmp_path) -> None:
    """opt2vec inside Trainer: attach() feeds the optimizer every step's loss (with accumulation)."""
    from lopt_hf.rules.opt2vec import slog

    tokenizer, dataset = lm
    artifact = create_artifact("opt2vec", seed=0)
    model = tiny_gpt2(tokenizer.vocab_size)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=4, gradient_accumulation_steps=2),
                      train_dataset=dataset, optimizers=(load_lopt(artifact, model), None))
    LearnedOptimizerCallback.attach(trainer)
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    learned = unwrap_optimizer(trainer.optimizer)
    history = next(iter(learned.state.values()))["history"]  # rows: oldest → newest; column 0 = slog(loss)
    expected = slog(torch.tensor(losses))
    torch.testing.assert_close(history[-4:, 0], expected, atol=2e-4, rtol=0)  # logged losses are rounded


def test_loss_needing_rule_without_attach_is_a_clear_error(lm, tmp_path) -> None:
    tokenizer, dataset = lm
    model = tiny_gpt2(tokenizer.vocab_size)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=dataset,
                      optimizers=(load_lopt(create_artifact("opt2vec", seed=0), model), None),
                      callbacks=[LearnedOptimizerCallback()])
    with pytest.raises(RuntimeError, match="attach"):
        trainer.train()
