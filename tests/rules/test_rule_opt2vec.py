"""opt2vec: history features, heads → momentum SGD, the loss plumbing, meta-differentiability."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import grad as func_grad
from torch.func import vmap

from lopt_hf import LearnedOptimizer, create_artifact, load_lopt
from lopt_hf.rules import RuleConfigError, build_rule
from lopt_hf.rules.opt2vec import slog

SMALL = {"history_length": 4, "embedding_dim": 8}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(num: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(num)]


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def heads_theta(rule, lr_scale: float, momentum: float) -> dict[str, torch.Tensor]:
    """Random encoder, zero head weights: the heads output a constant learning-rate scale and momentum."""
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    theta["w2"] = torch.zeros_like(theta["w2"])
    ratio = momentum / rule.max_momentum
    theta["b2"] = torch.tensor([math.atanh(math.log(lr_scale) / math.log(rule.max_lr_scale)),
                                math.log(ratio / (1 - ratio))])
    return theta


# ---------------------------------------------------------------------------- the rule itself


def test_theta_shapes_follow_history_and_features() -> None:
    rule = build_rule("opt2vec")
    assert rule.needs_loss
    assert rule.theta_shapes() == {"w0": (16 * 6, 64), "b0": (64,), "w1": (64, 64), "b1": (64,), "w2": (64, 2),
                                   "b2": (2,)}
    basic = build_rule("opt2vec", history_length=5, embedding_dim=12, use_extended_features=False)
    assert basic.feature_names == ("loss", "grad_norm", "learning_rate")
    assert basic.theta_shapes()["w0"] == (15, 12)
    assert set(basic.init_state(torch.zeros(3))) == {"momentum", "history", "log_lr_scale"}


@pytest.mark.parametrize("bad", [{"history_length": 0}, {"embedding_dim": 2.5}, {"activation": "swish"},
                                 {"base_lr": -0.1}, {"max_momentum": 1.0}, {"initial_momentum": 0.995},
                                 {"max_lr_scale": 1.0}, {"use_extended_features": "yes"}, {"unknown": 1}])
def test_rejects_bad_hyperparameters(bad: dict) -> None:
    with pytest.raises((RuleConfigError, ValueError)):
        build_rule("opt2vec", **bad)


def test_init_theta_is_momentum_sgd_with_initial_momentum() -> None:
    rule = build_rule("opt2vec", initial_momentum=0.8)
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    log_lr_scale, momentum = rule.read_history(theta, torch.zeros(rule.history_length, len(rule.feature_names)))
    torch.testing.assert_close(momentum, torch.tensor(0.8), rtol=1e-6, atol=0)
    assert abs(float(log_lr_scale)) < 1e-6


def test_heads_set_the_learning_rate_scale_and_momentum() -> None:
    rule = build_rule("opt2vec", **SMALL, base_lr=0.05)
    theta = heads_theta(rule, lr_scale=2.0, momentum=0.5)
    gen = torch.Generator().manual_seed(0)
    param, grads = torch.randn(4, 3, generator=gen), [torch.randn(4, 3, generator=gen) for _ in range(2)]
    state = rule.init_state(param)
    first, state = rule.update(theta, param, grads[0], state, 0, loss=1.0)
    second, state = rule.update(theta, param, grads[1], state, 1, loss=0.9)
    torch.testing.assert_close(first, 0.05 * 2.0 * grads[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(second, 0.05 * 2.0 * (0.5 * grads[0] + grads[1]), rtol=1e-5, atol=0)
    torch.testing.assert_close(state["log_lr_scale"], torch.tensor(math.log(2.0)), rtol=1e-5, atol=0)


def test_history_rows_hold_the_documented_features() -> None:
    rule = build_rule("opt2vec", **SMALL)
    theta = rule.init_theta(torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    param = torch.randn(5, 2, generator=gen)
    state = rule.init_state(param)
    losses = [2.0, 1.5, 1.4, 0.9]
    rows = []
    for step, loss in enumerate(losses):
        grad = torch.randn(5, 2, generator=gen)
        previous = state
        _, state = rule.update(theta, param, grad, state, step, loss=torch.tensor(loss))
        momentum = previous["momentum"]
        cosine = (grad * momentum).sum() / (grad.norm() * momentum.norm()) if step else torch.tensor(0.0)
        curvature = slog(torch.tensor(loss - 2 * losses[step - 1] + losses[step - 2])) if step >= 2 else 0.0
        expected = torch.stack([slog(torch.tensor(loss)), slog(grad.pow(2).mean().sqrt()),
                                previous["log_lr_scale"], slog(param.pow(2).mean().sqrt()), cosine,
                                torch.as_tensor(curvature, dtype=torch.float32)])
        torch.testing.assert_close(state["history"][-1], expected, rtol=1e-5, atol=1e-6)
        rows.append(expected)
        # The history rolls: older rows move up, zeros are left from before the first step.
        for back, row in enumerate(reversed(rows)):
            torch.testing.assert_close(state["history"][-1 - back], row, rtol=1e-5, atol=1e-6)
        assert torch.equal(state["history"][: rule.history_length - len(rows)],
                           torch.zeros(rule.history_length - len(rows), 6))
    torch.testing.assert_close(state["recent_losses"], torch.tensor(losses[-2:]))


def test_the_loss_changes_the_update() -> None:
    rule = build_rule("opt2vec", **SMALL)
    gen = torch.Generator().manual_seed(3)
    theta = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in rule.init_theta(gen).items()}
    param, grad = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    state = rule.init_state(param)
    low, _ = rule.update(theta, param, grad, state, 0, loss=0.1)
    high, _ = rule.update(theta, param, grad, state, 0, loss=5.0)
    assert not torch.allclose(low, high)


def test_update_without_loss_is_a_clear_error() -> None:
    rule = build_rule("opt2vec", **SMALL)
    param = torch.zeros(3)
    with pytest.raises(ValueError, match="needs the training loss"):
        rule.update(rule.init_theta(), param, param, rule.init_state(param), 0)
    with pytest.raises(ValueError, match="scalar"):
        rule.update(rule.init_theta(), param, param, rule.init_state(param), 0, loss=torch.ones(2))


# ------------------------------------------------------------------ meta-training readiness


def quadratic_unroll(rule, theta, params0, scales, steps: int = 4) -> torch.Tensor:
    """Mean loss of ``steps`` opt2vec steps on f(p) = ½ Σ scale·p², differentiable in theta."""
    param, state = params0, {k: v.to(params0.dtype) for k, v in rule.init_state(params0).items()}
    total = 0.0
    for step in range(steps):
        loss = 0.5 * (scales * param * param).sum()
        step_out, state = rule.update(theta, param, scales * param, state, step, loss=loss)
        param = param - step_out
        total = total + loss
    return (total + 0.5 * (scales * param * param).sum()) / (steps + 1)


def test_meta_gradient_through_an_unroll_matches_finite_differences() -> None:
    # Gradients flow through the steps *and* the carried state (momentum, history, lr scale).
    rule = build_rule("opt2vec", **SMALL, base_lr=0.1)
    gen = torch.Generator().manual_seed(4)
    theta = {k: (v + 0.2 * torch.randn(v.shape, generator=gen)).double() for k, v in rule.init_theta(gen).items()}
    params0 = torch.randn(7, generator=gen, dtype=torch.float64)
    scales = torch.rand(7, generator=gen, dtype=torch.float64) * 3 + 0.1

    analytic = func_grad(lambda th: quadratic_unroll(rule, th, params0, scales))(theta)
    assert all(torch.isfinite(v).all() for v in analytic.values())
    eps = 1e-6
    for key in ("w0", "b1", "w2", "b2"):
        index = int(analytic[key].abs().argmax())
        assert analytic[key].reshape(-1)[index] != 0, key
        plus = {k: v.clone() for k, v in theta.items()}
        minus = {k: v.clone() for k, v in theta.items()}
        plus[key].view(-1)[index] += eps
        minus[key].view(-1)[index] -= eps
        numeric = (quadratic_unroll(rule, plus, params0, scales) - quadratic_unroll(rule, minus, params0, scales)) / (
            2 * eps)
        torch.testing.assert_close(analytic[key].reshape(-1)[index], numeric, rtol=1e-5, atol=1e-10, msg=key)


def test_vmap_over_tasks_and_perturbations() -> None:
    rule = build_rule("opt2vec", **SMALL)
    gen = torch.Generator().manual_seed(5)
    base_theta = rule.init_theta(gen)
    thetas = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base_theta.items()} for _ in range(4)]
    params0 = torch.randn(4, 7, generator=gen)
    scales = torch.rand(4, 7, generator=gen) + 0.5
    stacked = {k: torch.stack([t[k] for t in thetas]) for k in base_theta}
    batched = vmap(lambda th, p, s: quadratic_unroll(rule, th, p, s))(stacked, params0, scales)
    looped = torch.stack([quadratic_unroll(rule, thetas[i], params0[i], scales[i]) for i in range(4)])
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-7)
    # and the meta-gradient of the batch mean, vmapped over perturbations, is finite
    meta_grads = vmap(func_grad(lambda th, p, s: quadratic_unroll(rule, th, p, s)))(stacked, params0, scales)
    assert all(v.shape[0] == 4 and torch.isfinite(v).all() for v in meta_grads.values())


# ------------------------------------------------------------------------- LearnedOptimizer


def make_optimizer(model: nn.Module, theta=None, **rule_config) -> LearnedOptimizer:
    rule = build_rule("opt2vec", **{**SMALL, **rule_config})
    return LearnedOptimizer(model.parameters(), rule,
                            theta if theta is not None else rule.init_theta(torch.Generator().manual_seed(0)))


def loss_and_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def test_zero_head_weights_train_exactly_like_torch_sgd_with_momentum() -> None:
    rule = build_rule("opt2vec", **SMALL, base_lr=0.05)
    theta = heads_theta(rule, lr_scale=1.0, momentum=0.9)
    _, momentum = rule.read_history(theta, torch.zeros(4, 6))
    learned_model, sgd_model = small_model(), small_model()
    learned = LearnedOptimizer(learned_model.parameters(), rule, theta)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.05, momentum=float(momentum))
    for x, y in batches(20):
        for model, opt in ((learned_model, learned), (sgd_model, sgd)):
            opt.zero_grad()
            loss = loss_and_backward(model, x, y)
            opt.step(loss=loss) if opt is learned else opt.step()
    torch.testing.assert_close(flat_params(learned_model), flat_params(sgd_model), rtol=1e-5, atol=1e-6)


def test_step_without_a_loss_raises_and_changes_nothing() -> None:
    model = small_model()
    opt = make_optimizer(model)
    before = flat_params(model)
    loss_and_backward(model, *batches(1)[0])
    with pytest.raises(RuntimeError, match=r"needs the training loss.*step\(closure\).*record_loss"):
        opt.step()
    assert torch.equal(flat_params(model), before) and not opt.state
    with pytest.raises(ValueError, match="either a closure or loss"):
        opt.step(lambda: torch.tensor(1.0), loss=1.0)


def test_closure_explicit_and_recorded_losses_agree() -> None:
    data = batches(6)
    results = {}
    for mode in ("closure", "explicit", "recorded", "float"):
        model = small_model()
        opt = make_optimizer(model)
        for x, y in data:
            def closure(opt=opt, model=model, x=x, y=y):
                opt.zero_grad()
                return loss_and_backward(model, x, y)

            if mode == "closure":
                returned = opt.step(closure)
                assert isinstance(returned, torch.Tensor)
                continue
            loss = closure()
            if mode == "explicit":
                assert opt.step(loss=loss) is None
            elif mode == "float":
                opt.step(loss=loss.item())
            else:
                opt.record_loss(loss)
                opt.step()
        results[mode] = flat_params(model)
        if mode == "recorded":  # a recorded loss serves one step only
            with pytest.raises(RuntimeError, match="needs the training loss"):
                opt.step()
    for mode in ("explicit", "recorded", "float"):
        assert torch.equal(results[mode], results["closure"]), mode


def test_nonfinite_loss_skips_the_learned_tensors() -> None:
    model = small_model()
    opt = make_optimizer(model)
    x, y = batches(1)[0]
    opt.step(loss=loss_and_backward(model, x, y))
    before, state_before = flat_params(model), {k: v.clone() for k, v in opt.state[model[0].weight].items()
                                                if isinstance(v, torch.Tensor)}
    opt.step(loss=float("nan"))
    assert torch.equal(flat_params(model), before)
    assert opt.num_skipped_nonfinite == 4 and opt.last_step_stats()["skipped_nonfinite_tensors"] == 4
    assert opt.state[model[0].weight]["step"] == 1
    for key, value in state_before.items():
        assert torch.equal(opt.state[model[0].weight][key], value), key


def test_other_rules_ignore_the_loss() -> None:
    from lopt_hf.rules import build_rule as build

    results = []
    for kwargs in ({}, {"loss": 3.0}):
        model = small_model()
        rule = build("per_param_mlp")
        opt = LearnedOptimizer(model.parameters(), rule, rule.init_theta(torch.Generator().manual_seed(0)))
        loss_and_backward(model, *batches(1)[0])
        opt.step(**kwargs)
        results.append(flat_params(model))
    assert torch.equal(*results)


def test_artifact_round_trip_and_load_lopt_train_digits(tmp_path) -> None:
    from sklearn.datasets import load_digits

    config = {**SMALL, "base_lr": 0.1, "activation": "tanh", "use_extended_features": False}
    create_artifact("opt2vec", seed=3, rule_config=config).save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = load_lopt(tmp_path, model)
    assert opt.rule.name == "opt2vec" and opt.rule == build_rule("opt2vec", **config)
    features, labels = load_digits(return_X_y=True)
    inputs, targets = torch.tensor(features / 16.0, dtype=torch.float32), torch.tensor(labels)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        batch = torch.randint(0, len(inputs), (64,), generator=gen)
        opt.zero_grad()
        loss = loss_and_backward(model, inputs[batch], targets[batch])
        opt.step(loss=loss)
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]  # at init ≈ momentum SGD: it learns
