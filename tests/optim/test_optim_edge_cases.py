"""LearnedOptimizer under misuse and odd input (issue 19, hole 8): a step checks before it changes anything,
0-element tensors work in every rule, a state saved for other shapes is refused on load, and one huge
gradient cannot freeze an AdamW-routed element."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from lopt_hf.adamw import adamw_step
from lopt_hf.optim import ADAMW_GRAD_LIMIT, LearnedOptimizer
from lopt_hf.rules import available_rules, build_rule
from support import small_rule

EMPTY_SHAPES = [(0,), (0, 3), (3, 0), (2, 0, 3, 3)]
SHAPES = [(4, 3), (5,), (2, 2, 3, 3)]


def optimizer_for(params, rule_name: str, **kwargs) -> LearnedOptimizer:
    rule = small_rule(rule_name)
    optimizer = LearnedOptimizer(params, rule, rule.init_theta(torch.Generator().manual_seed(0)), **kwargs)
    if rule.scheduled:  # scheduled rules plan by the length of training
        optimizer.set_total_steps(20)
    return optimizer


def set_grads(params: list[torch.Tensor], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)


def through_torch_save(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # how transformers.Trainer reloads optimizer.pt


# ----------------------------------------------------------------------------------- (a) sparse gradients
@pytest.mark.parametrize("first_route", ["learned", "adamw"])
def test_a_sparse_gradient_is_refused_before_any_group_is_stepped(first_route: str) -> None:
    torch.manual_seed(0)
    dense, embedding = nn.Linear(4, 3), nn.Embedding(10, 4, sparse=True)
    rule = build_rule("small_fc_lopt")
    optimizer = LearnedOptimizer([{"params": dense.parameters(), "route": first_route},
                                  {"params": embedding.parameters()}], rule, rule.init_theta())
    dense(embedding(torch.tensor([1, 2, 3]))).sum().backward()
    assert embedding.weight.grad.is_sparse
    before = [p.detach().clone() for p in dense.parameters()]
    with pytest.raises(RuntimeError, match=r"sparse gradients \(param group 1, tensor 0 of shape \(10, 4\)\)"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(dense.parameters(), before))  # group 0 was not stepped
    assert not optimizer.state  # and no state was created
    embedding.weight.grad = None
    optimizer.step()  # the same optimizer steps once the sparse gradient is gone
    assert all(not torch.equal(p, b) for p, b in zip(dense.parameters(), before))


# ------------------------------------------------------------------------------- (b) 0-element tensors
def run(rule_name: str, with_empty: bool, steps: int = 3):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    empty = [nn.Parameter(torch.randn(shape)) for shape in EMPTY_SHAPES] if with_empty else []
    # interleaved, and one empty tensor in an AdamW-routed group of its own
    groups = [{"params": params[:1] + empty[:2] + params[1:] + empty[2:3]}]
    if with_empty:
        groups.append({"params": empty[3:], "route": "adamw"})
    optimizer = optimizer_for(groups, rule_name)
    for step in range(steps):
        set_grads(params, step)
        set_grads(empty, 100 + step)
        optimizer.step(loss=1.0 + step)
    return optimizer, params, empty


@pytest.mark.parametrize("rule_name", available_rules())
def test_zero_element_tensors_are_left_as_they_are_in_every_rule(rule_name: str) -> None:
    reference, reference_params, _ = run(rule_name, with_empty=False)
    optimizer, params, empty = run(rule_name, with_empty=True)
    # the other tensors are stepped exactly as without the empty ones (nothing leaks into the scheduler's
    # whole-model statistics), and the empty ones are neither updated nor counted as skipped
    for param, expected in zip(params, reference_params):
        assert torch.equal(param, expected)
    assert all(param.numel() == 0 and not optimizer.state[param] for param in empty)
    assert optimizer.last_step_stats() == reference.last_step_stats()
    assert optimizer.num_skipped_nonfinite == 0

    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    resumed_empty = [nn.Parameter(p.detach().clone()) for p in empty]
    learned = resumed_params[:1] + resumed_empty[:2] + resumed_params[1:] + resumed_empty[2:3]
    resumed = optimizer_for([{"params": learned}, {"params": resumed_empty[3:], "route": "adamw"}], rule_name)
    resumed.load_state_dict(through_torch_save(optimizer.state_dict()))
    for opt, ps, es in ((optimizer, params, empty), (resumed, resumed_params, resumed_empty)):
        set_grads(ps, 7)
        set_grads(es, 8)
        opt.step(loss=2.0)
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))


# ----------------------------------------------------------------------- (c) state of other shapes on load
def stepped(rule_name: str, model: nn.Module, **rule_config) -> LearnedOptimizer:
    rule = build_rule(rule_name, **rule_config) if rule_config else small_rule(rule_name)
    optimizer = LearnedOptimizer(model.parameters(), rule, rule.init_theta(torch.Generator().manual_seed(0)))
    if rule.scheduled:
        optimizer.set_total_steps(20)
    set_grads(list(model.parameters()), 0)
    optimizer.step(loss=1.0)
    return optimizer


def snapshot(optimizer: LearnedOptimizer) -> dict:
    return copy.deepcopy({"state": optimizer.state_dict(), "groups": optimizer.param_groups})


def assert_unchanged(optimizer: LearnedOptimizer, before: dict) -> None:
    after = optimizer.state_dict()
    assert after["param_groups"] == before["state"]["param_groups"]
    assert after["state"].keys() == before["state"]["state"].keys()
    for key, state in after["state"].items():
        for name, value in state.items():
            saved = before["state"]["state"][key][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(saved)), (key, name)


@pytest.mark.parametrize("rule_name", available_rules())
def test_state_saved_for_wider_layers_is_refused_before_anything_loads(rule_name: str) -> None:
    torch.manual_seed(0)
    wide = stepped(rule_name, nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)))
    narrow_model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    narrow = stepped(rule_name, narrow_model)
    before = snapshot(narrow)
    with pytest.raises(ValueError, match=r"state of parameter 0 \(shape \(8, 6\)\): '\w+' has shape .*nothing was "
                                         r"loaded"):
        narrow.load_state_dict(through_torch_save(wide.state_dict()))
    assert_unchanged(narrow, before)
    set_grads(list(narrow_model.parameters()), 1)
    narrow.step(loss=1.0)  # still works


@pytest.mark.parametrize("rule_name, saved_config, key", [
    ("mlp_lopt", {"momentum_decays": (0.9, 0.99, 0.999)}, "momentum"),
    ("opt2vec", {"history_length": 4}, "history"),
    ("small_fc_lopt", {"initial_rms_decays": (0.9, 0.99, 0.999)}, "rms"),
])
def test_state_saved_by_the_rule_with_other_hyperparameters_is_refused(rule_name, saved_config, key) -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    saved = stepped(rule_name, model, **saved_config).state_dict()
    optimizer = stepped(rule_name, model)  # the rule's defaults
    before = snapshot(optimizer)
    with pytest.raises(ValueError, match=rf"parameter 0 \(shape \(4, 5\)\): '{key}' has shape"):
        optimizer.load_state_dict(through_torch_save(saved))
    assert_unchanged(optimizer, before)


def test_missing_or_unknown_keys_and_bad_counts_are_refused() -> None:
    model = nn.Linear(5, 4)
    optimizer = stepped("small_fc_lopt", model)
    cases = {"missing \\['v_row'\\]": lambda s: s["state"][0].pop("v_row"),
             "unknown \\['extra'\\]": lambda s: s["state"][0].update(extra=torch.zeros(1)),
             "'step' must be a count": lambda s: s["state"][0].update(step=-1),
             "'momentum' has a float": lambda s: s["state"][0].update(momentum=1.0),
             "param groups of sizes \\[1\\]": lambda s: s["param_groups"][0].update(params=[0])}
    for message, damage in cases.items():
        state = optimizer.state_dict()
        state = {"state": {k: dict(v) for k, v in state["state"].items()},
                 "param_groups": [dict(g) for g in state["param_groups"]]}
        damage(state)
        with pytest.raises(ValueError, match=message):
            optimizer.load_state_dict(state)


def test_adamw_routed_state_and_schedule_state_are_checked_too() -> None:
    torch.manual_seed(0)
    wide, narrow = nn.Linear(5, 6), nn.Linear(5, 4)
    rule = small_rule("celo")
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    optimizers = []
    for model in (wide, narrow):
        optimizer = LearnedOptimizer([{"params": [model.weight]}, {"params": [model.bias], "route": "adamw"}], rule,
                                     theta)
        optimizer.set_total_steps(20)
        set_grads(list(model.parameters()), 0)
        optimizer.step(loss=1.0)
        optimizers.append(optimizer)
    saved = optimizers[0].state_dict()
    saved["state"][0] = optimizers[1].state_dict()["state"][0]  # the learned tensor fits; the AdamW one does not
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(4,\)\): 'exp_avg' has shape \(6,\)"):
        optimizers[1].load_state_dict(saved)
    saved = optimizers[1].state_dict()
    saved["state"]["schedule"] = dict(saved["state"]["schedule"], loss_means=torch.zeros(3))
    with pytest.raises(ValueError, match=r"'schedule' \(the whole-model state\): 'loss_means' has shape \(3,\)"):
        optimizers[1].load_state_dict(saved)


# -------------------------------------------------------------------------------- (d) one huge AdamW gradient
def test_a_gradient_whose_square_overflows_does_not_freeze_an_adamw_element() -> None:
    """g = 1e30 would make AdamW's float32 second moment inf and that element would never move again
    (m / (√v + eps) = 0): the AdamW route skips such a tensor and counts it, like a NaN gradient."""
    torch.manual_seed(0)
    param, other = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
    rule = build_rule("small_fc_lopt")
    optimizer = LearnedOptimizer([{"params": [param, other], "route": "adamw", "lr": 0.1}], rule, rule.init_theta())
    param.grad, other.grad = torch.ones(4, 3), torch.ones(3)
    optimizer.step()
    before, moments = param.detach().clone(), {k: v.clone() for k, v in optimizer.state[param].items()
                                               if isinstance(v, torch.Tensor)}
    param.grad = torch.ones(4, 3)
    param.grad[0, 0] = 1e30
    optimizer.step()
    assert torch.equal(param, before) and optimizer.num_skipped_nonfinite == 1
    assert all(torch.equal(optimizer.state[param][k], v) for k, v in moments.items())  # moments untouched
    assert optimizer.state[other]["step"] == 2  # the group's other tensor stepped
    param.grad = torch.ones(4, 3)
    optimizer.step()
    assert (param != before).all()  # every element, [0, 0] included, keeps moving
    assert torch.isfinite(optimizer.state[param]["exp_avg_sq"]).all()


@pytest.mark.parametrize("magnitude, skipped", [(0.99 * ADAMW_GRAD_LIMIT, 0), (ADAMW_GRAD_LIMIT, 1)])
def test_the_limit_is_exact_and_large_usable_gradients_step_as_plain_adamw(magnitude: float, skipped: int) -> None:
    """Below the limit the step is the unchanged AdamW math (bit for bit); the 2-norm of a big tensor of
    large-but-usable elements exceeds the limit, so the exact per-element check decides."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(1000))
    rule = build_rule("small_fc_lopt")
    optimizer = LearnedOptimizer([{"params": [param], "route": "adamw", "lr": 0.1}], rule, rule.init_theta())
    grad = torch.full((1000,), 1e17)
    grad[3] = magnitude
    expected = param.detach().clone()
    adamw_step([expected], [grad.clone()], [torch.zeros(1000)], [torch.zeros(1000)], [1], lr=0.1)
    param.grad = grad
    optimizer.step()
    assert optimizer.num_skipped_nonfinite == skipped
    assert torch.equal(param, expected) if not skipped else not torch.equal(param, expected)
