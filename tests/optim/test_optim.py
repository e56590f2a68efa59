"""LearnedOptimizer: the torch.optim contract around an update rule."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lopt_hf.optim import LearnedOptimizer, _row_max_abs, _row_norms
from support import small_rule

from lopt_hf.rules import available_rules, build_rule


def make_optimizer(model: nn.Module, rule_name: str = "per_param_mlp", **kwargs) -> LearnedOptimizer:
    rule = small_rule(rule_name)
    optimizer = LearnedOptimizer(model.parameters(), rule, rule.init_theta(torch.Generator().manual_seed(0)), **kwargs)
    if rule.scheduled:  # scheduled rules (celo, velo) plan by the length of training
        optimizer.set_total_steps(50)
    return optimizer


def small_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batches(num: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(num)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data) -> list[float]:
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)
        loss.backward()
        opt.step(loss=loss)  # rules with needs_loss (opt2vec) use it, the others ignore it
        losses.append(loss.item())
    return losses


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("rule_name", available_rules())
def test_lr_scales_the_learned_step(rule_name: str) -> None:
    changes = {}
    for lr in (1.0, 0.25):
        model = small_model()
        before = flat_params(model)
        train(model, make_optimizer(model, rule_name, lr=lr), batches(1))
        changes[lr] = flat_params(model) - before
    assert changes[1.0].abs().max() > 0
    torch.testing.assert_close(changes[0.25], 0.25 * changes[1.0], rtol=1e-4, atol=1e-7)


def test_decoupled_weight_decay() -> None:
    plain, decayed = small_model(), small_model()
    before = flat_params(plain)
    train(plain, make_optimizer(plain, lr=0.5), batches(1))
    train(decayed, make_optimizer(decayed, lr=0.5, weight_decay=0.1), batches(1))
    # p_new = p*(1 - lr*wd) - lr*step  ==  (p - lr*step) - lr*wd*p
    torch.testing.assert_close(flat_params(decayed), flat_params(plain) - 0.5 * 0.1 * before, rtol=1e-5, atol=1e-7)


def test_param_groups_have_their_own_lr() -> None:
    model = small_model()
    rule = build_rule("per_param_mlp")
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    first, second = model[0], model[2]
    opt = LearnedOptimizer([{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.0}], rule, theta)
    frozen = flat_params(second)
    moving = flat_params(first)
    train(model, opt, batches(2))
    assert torch.equal(flat_params(second), frozen)
    assert not torch.equal(flat_params(first), moving)
    # LR schedulers drive group lr.
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.5


def test_step_closure_returns_loss() -> None:
    model = small_model()
    opt = make_optimizer(model)
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_never_reaches_parameters(bad: float) -> None:
    model = small_model()
    opt = make_optimizer(model)
    train(model, opt, batches(1))
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    x, y = batches(1, seed=5)[0]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    first = next(model.parameters())
    first.grad[0, 0] = bad
    opt.step()
    assert torch.equal(first, before[0])  # the poisoned tensor was skipped ...
    assert not torch.equal(list(model.parameters())[1], before[1])  # ... the others stepped
    assert opt.num_skipped_nonfinite == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    skipped_state = opt.state_dict()["state"][0]
    assert skipped_state["step"] == state_before[0]["step"]
    assert torch.equal(skipped_state["momentum"], state_before[0]["momentum"])


@pytest.mark.parametrize("shape", [(1, 300, 7), (1, 5000), (4, 30, 3), (6,), (1, 1)])
@pytest.mark.parametrize("fill", ["normal", "huge", "nan", "inf"])
def test_the_step_checks_reductions_equal_vector_norm(shape: tuple[int, ...], fill: str) -> None:
    """The 2-norms (a stack of one through BLAS's dot) and largest magnitudes (not ``vector_norm(ord=inf)``,
    slow on CPU) the step's checks use equal ``vector_norm``'s, also where float32 squares overflow (a norm
    past 1.8e19), and NaN / inf come out NaN / inf."""
    stacked = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if fill == "huge":
        stacked = stacked * 1e30
    elif fill != "normal":
        stacked.view(-1)[len(stacked.view(-1)) // 2] = float(fill)
    dims = tuple(range(1, stacked.dim()))
    expected_norms = torch.linalg.vector_norm(stacked, dim=dims) if dims else stacked.abs()
    expected_max = torch.linalg.vector_norm(stacked, ord=float("inf"), dim=dims) if dims else stacked.abs()
    torch.testing.assert_close(_row_norms(stacked), expected_norms, rtol=1e-5, atol=0.0, equal_nan=True)
    torch.testing.assert_close(_row_max_abs(stacked), expected_max, rtol=0.0, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule_name", available_rules())
def test_save_load_continue_is_bit_identical(rule_name: str, dtype: torch.dtype, tmp_path) -> None:
    data = batches(8)
    reference_model = small_model(dtype)
    reference_opt = make_optimizer(reference_model, rule_name)
    reference_losses = train(reference_model, reference_opt, data)

    model = small_model(dtype)
    opt = make_optimizer(model, rule_name)
    losses = train(model, opt, data[:4])
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain tensors/values only
    resumed_model = small_model(dtype)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt = make_optimizer(resumed_model, rule_name)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    losses += train(resumed_model, resumed_opt, data[4:])

    assert losses == reference_losses
    for a, b in zip(resumed_model.parameters(), reference_model.parameters()):
        assert a.dtype == dtype and torch.equal(a, b)
    for state in resumed_opt.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if isinstance(v, torch.Tensor) and
                   v.is_floating_point())


def test_state_dict_holds_only_tensors_and_plain_values() -> None:
    model = small_model()
    opt = make_optimizer(model)
    train(model, opt, batches(2))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["param_groups"][0]["rule"] == "per_param_mlp"
    assert loaded["state"][0]["step"] == 2


def test_refuses_state_of_another_rule() -> None:
    model = small_model()
    opt = make_optimizer(model)
    train(model, opt, batches(1))
    state = opt.state_dict()
    state["param_groups"][0]["rule"] = "some_other_rule"
    with pytest.raises(ValueError, match="some_other_rule"):
        make_optimizer(small_model()).load_state_dict(state)


def test_rejects_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="learning rate"):
        make_optimizer(small_model(), lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        make_optimizer(small_model(), weight_decay=-0.1)
