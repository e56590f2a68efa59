"""Lookahead: hand-computed trajectories, schedulers, checkpoints, Trainer and Accelerate."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lopt_hf import LearnedOptimizer, Lookahead, build_rule, create_artifact, load_lopt
from lopt_hf.optim import LearnedOptimizerSettingsWarning

A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.4]], dtype=torch.float64)
X0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
STEPS = 12


def quadratic_run(optimizer_factory, steps: int = STEPS, scheduler_factory=None) -> list[torch.Tensor]:
    """Minimise f(x) = ½ xᵀAx; return x after every step."""
    x = nn.Parameter(X0.clone())
    optimizer = optimizer_factory([x])
    scheduler = scheduler_factory(optimizer) if scheduler_factory else None
    trajectory = []
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * x @ A @ x).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        trajectory.append(x.detach().clone())
    return trajectory


def by_hand(lrs: list[float], sync_period: int, alpha: float, weight_decay: float = 0.0,
            clip_norm: float | None = None, clip_value: float | None = None) -> list[torch.Tensor]:
    """Lookahead around plain SGD, written out: clip, decay, SGD step, sync every k steps."""
    fast, slow = X0.clone(), X0.clone()
    trajectory = []
    for step, lr in enumerate(lrs, start=1):
        g = A @ fast
        if clip_norm is not None:
            g = g * min(1.0, clip_norm / float(g.norm()))
        if clip_value is not None:
            g = g.clamp(-clip_value, clip_value)
        fast = fast * (1.0 - lr * weight_decay) - lr * g
        if step % sync_period == 0:
            slow = slow + alpha * (fast - slow)
            fast = slow.clone()
        trajectory.append(fast)
    return trajectory


@pytest.mark.parametrize("alpha", [0.5, 0.3, 1.0, 0.0])
def test_quadratic_trajectory_matches_hand_computation(alpha: float) -> None:
    got = quadratic_run(lambda params: Lookahead(torch.optim.SGD(params, lr=0.1), sync_period=5, alpha=alpha))
    expected = by_hand([0.1] * STEPS, sync_period=5, alpha=alpha)
    for step, (a, b) in enumerate(zip(got, expected), start=1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"step {step}")
    if alpha == 1.0:  # slow weights jump to the fast ones: plain SGD
        plain = quadratic_run(lambda params: torch.optim.SGD(params, lr=0.1))
        torch.testing.assert_close(got[-1], plain[-1], rtol=1e-12, atol=1e-14)
    if alpha == 0.0:  # slow weights never move: back to the start at every sync
        torch.testing.assert_close(got[4], X0, rtol=0, atol=0)
        torch.testing.assert_close(got[9], X0, rtol=0, atol=0)
    assert not torch.equal(got[5], got[4])  # fast weights move again after a sync


def test_sync_moves_slow_weights_between_syncs_only() -> None:
    x = nn.Parameter(X0.clone())
    opt = Lookahead(torch.optim.SGD([x], lr=0.1), sync_period=5, alpha=0.5)
    for step in range(1, 11):
        opt.zero_grad()
        (0.5 * x @ A @ x).backward()
        opt.step()
        slow = opt.state[x]["slow_param"]
        if step % 5 == 0:
            assert torch.equal(slow, x.detach())  # fast reset to slow
        else:
            assert not torch.equal(slow, x.detach())
        if step < 5:
            assert torch.equal(slow, X0)  # untouched until the first sync


def test_clipping_and_weight_decay_match_hand_computation() -> None:
    settings = {"weight_decay": 0.05, "clip_norm": 0.8, "clip_value": 0.5}
    got = quadratic_run(lambda params: Lookahead(torch.optim.SGD(params, lr=0.1), sync_period=5, alpha=0.5,
                                                 weight_decay=0.05, grad_clip_norm=0.8, grad_clip_value=0.5))
    expected = by_hand([0.1] * STEPS, sync_period=5, alpha=0.5, **settings)
    for step, (a, b) in enumerate(zip(got, expected), start=1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"step {step}")
    # Each of them really acts on this problem.
    off = {"weight_decay": 0.0, "clip_norm": None, "clip_value": None}
    for name in settings:
        other = by_hand([0.1] * STEPS, sync_period=5, alpha=0.5, **{**settings, name: off[name]})
        assert not torch.allclose(other[-1], expected[-1]), name


def test_clipping_rewrites_gradients_like_torch_and_optax() -> None:
    first, second = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    opt = Lookahead(torch.optim.SGD([first, second], lr=0.0), grad_clip_norm=1.0)
    first.grad, second.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    opt.step()
    torch.testing.assert_close(first.grad, torch.tensor([0.6, 0.0]))  # global norm 5 -> 1
    torch.testing.assert_close(second.grad, torch.tensor([0.0, 0.8, 0.0]))
    first.grad, second.grad = torch.tensor([0.3, 0.0]), torch.tensor([0.0, 0.4, 0.0])
    opt.step()
    torch.testing.assert_close(first.grad, torch.tensor([0.3, 0.0]))  # below the limit: untouched


def test_param_groups_are_the_base_optimizers_and_schedulers_reach_it() -> None:
    x = nn.Parameter(X0.clone())
    base = torch.optim.SGD([x], lr=0.1)
    opt = Lookahead(base, sync_period=5)
    assert opt.param_groups is base.param_groups and opt.defaults is base.defaults
    opt.param_groups[0]["lr"] = 0.05
    assert base.param_groups[0]["lr"] == 0.05
    # torch's load_state_dict gives the base a *new* list of groups (Accelerate's prepare does this).
    base.load_state_dict(base.state_dict())
    opt.param_groups[0]["lr"] = 0.1
    assert opt.param_groups is base.param_groups and base.param_groups[0]["lr"] == 0.1

    got = quadratic_run(lambda params: Lookahead(torch.optim.SGD(params, lr=0.1), sync_period=5),
                        scheduler_factory=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5))
    lrs = [0.1 * 0.5 ** (step // 3) for step in range(STEPS)]
    expected = by_hand(lrs, sync_period=5, alpha=0.5)
    for step, (a, b) in enumerate(zip(got, expected), start=1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"step {step}")


def test_add_param_group_goes_to_the_base() -> None:
    first, second = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    base = torch.optim.SGD([first], lr=0.1)
    opt = Lookahead(base)
    opt.add_param_group({"params": [second], "lr": 0.2})
    assert len(base.param_groups) == 2 and base.param_groups[1]["params"] == [second]


# ------------------------------------------------------------------------------ checkpoints


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(num: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(num)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data) -> list[float]:
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss) if isinstance(opt.base_optimizer, LearnedOptimizer) else opt.step()
        losses.append(loss.item())
    return losses


BASES = {
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01),
    "sgd_momentum": lambda model: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
    "per_param_mlp": lambda model: LearnedOptimizer(model.parameters(), build_rule("per_param_mlp"),
                                                    build_rule("per_param_mlp").init_theta(
                                                        torch.Generator().manual_seed(0)), lr=0.1),
    "opt2vec": lambda model: LearnedOptimizer(model.parameters(), build_rule("opt2vec", history_length=4),
                                              build_rule("opt2vec", history_length=4).init_theta(
                                                  torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("base_name", list(BASES))
def test_save_load_continue_is_bit_identical(base_name: str) -> None:
    def make(model: nn.Module) -> Lookahead:
        return Lookahead(BASES[base_name](model), sync_period=5, alpha=0.5, weight_decay=0.01, grad_clip_norm=1.0)

    data = batches(13)
    reference_model = small_model()
    reference_losses = train(reference_model, make(reference_model), data)

    model = small_model()
    opt = make(model)
    losses = train(model, opt, data[:7])  # stop between two syncs
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert checkpoint["optimizer"]["lookahead"]["steps"] == 7

    resumed_model = small_model()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = make(resumed_model)
    resumed.load_state_dict(checkpoint["optimizer"])
    for a, b in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(resumed.state[a]["slow_param"], opt.state[b]["slow_param"])
    losses += train(resumed_model, resumed, data[7:])

    assert losses == reference_losses
    for a, b in zip(resumed_model.parameters(), reference_model.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_restores_settings_and_rejects_mismatches() -> None:
    model = small_model()
    opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), sync_period=3, alpha=0.25, grad_clip_value=2.0)
    train(model, opt, batches(2))
    saved = opt.state_dict()

    other = Lookahead(torch.optim.SGD(small_model().parameters(), lr=0.1))
    other.load_state_dict(saved)
    assert (other.sync_period, other.alpha, other.grad_clip_value, other.lookahead_steps) == (3, 0.25, 2.0, 2)

    with pytest.raises(ValueError, match="not a Lookahead state dict"):
        other.load_state_dict(torch.optim.SGD(small_model().parameters(), lr=0.1).state_dict())
    fewer = Lookahead(torch.optim.SGD(nn.Linear(6, 8).parameters(), lr=0.1))
    with pytest.raises(ValueError, match="parameter"):
        fewer.load_state_dict(saved)


def test_rejects_bad_settings() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Lookahead(params)
    for kwargs, match in (({"sync_period": 0}, "sync_period"), ({"alpha": 1.5}, "alpha"),
                          ({"weight_decay": -1.0}, "weight_decay"), ({"grad_clip_norm": 0.0}, "grad_clip_norm"),
                          ({"grad_clip_value": -1.0}, "grad_clip_value")):
        with pytest.raises(ValueError, match=match):
            Lookahead(torch.optim.SGD(params, lr=0.1), **kwargs)


def test_closure_loss_reaches_a_learned_base_that_needs_it() -> None:
    model = small_model()
    rule = build_rule("opt2vec", history_length=4)
    opt = Lookahead(LearnedOptimizer(model.parameters(), rule, rule.init_theta(torch.Generator().manual_seed(0))))
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before))


# ------------------------------------------------------------------- Trainer and Accelerate


class TokenBlocks(torch.utils.data.Dataset):
    def __init__(self, num: int = 32, length: int = 8, vocab: int = 16) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (num, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=16, n_layer=1, n_head=2))


def test_inside_transformers_trainer(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    create_artifact("per_param_mlp", seed=0).save_pretrained(tmp_path / "lopt")
    model = tiny_gpt2()
    opt = Lookahead(load_lopt(tmp_path / "lopt", model, lr=0.1), sync_period=5, alpha=0.5)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=4,
                             logging_steps=1, save_strategy="steps", save_steps=5, report_to=[], use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=TokenBlocks(), optimizers=(opt, None))
    # Trainer's defaults (linear decay, clipping) without LearnedOptimizerCallback: the wrapped optimizer says so
    with pytest.warns(LearnedOptimizerSettingsWarning, match="lr_scheduler_type=linear") as record:
        trainer.train()
    assert len(record) == 1 and record[0].filename == __file__  # the trainer.train() line above

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert opt.lookahead_steps == 5
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]), name
        assert torch.equal(param.detach(), opt.state[param]["slow_param"])  # step 5 was a sync
    # Trainer's linear-decay scheduler drove the base optimizer's lr (to 0 after the last step).
    assert opt.base_optimizer.param_groups[0]["lr"] == trainer.lr_scheduler.get_last_lr()[0] == 0.0

    saved = torch.load(tmp_path / "out" / "checkpoint-5" / "optimizer.pt", weights_only=True)
    fresh_model = tiny_gpt2()
    fresh = Lookahead(load_lopt(tmp_path / "lopt", fresh_model))
    fresh.load_state_dict(saved)
    assert fresh.lookahead_steps == 5
    for a, b in zip(fresh_model.parameters(), model.parameters()):
        assert torch.equal(fresh.state[a]["slow_param"], b.detach())


def test_with_accelerate_prepare() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    data = batches(5)

    def run(use_accelerate: bool) -> list[torch.Tensor]:
        model = small_model()
        opt = Lookahead(torch.optim.AdamW(model.parameters(), lr=1e-2), sync_period=2, alpha=0.5,
                        grad_clip_norm=1.0)
        accelerator = None
        if use_accelerate:
            accelerator = Accelerator(cpu=True)
            model, opt = accelerator.prepare(model, opt)
        for x, y in data:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss) if accelerator else loss.backward()
            opt.step()
        if accelerator is not None:
            assert opt.optimizer.lookahead_steps == 5
            saved = opt.state_dict()  # through AcceleratedOptimizer
            assert saved["lookahead"]["steps"] == 5 and len(saved["lookahead"]["slow_params"]) == 4
        return [p.detach().clone() for p in model.parameters()]

    try:
        plain, accelerated = run(False), run(True)
    finally:
        AcceleratorState._reset_state(True)
    for a, b in zip(plain, accelerated):
        assert torch.equal(a, b)
