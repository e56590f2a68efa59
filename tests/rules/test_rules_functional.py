"""Every registered rule is a pure torch function: vmap-able, differentiable in theta, deterministic."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad as func_grad
from torch.func import vmap

from support import small_rule

from lopt_hf.rules import available_rules, build_rule
from lopt_hf.rules.features import chunk_indices

RULES = available_rules()
SHAPES = [(5, 4), (6,), (2, 3, 4), (1,)]
BATCH = 3


def control_from(rule, loss: torch.Tensor) -> torch.Tensor:
    """A scheduled rule's control row made from a number: ``lr_mult`` then softmax mixing weights."""
    mixing = torch.softmax(torch.arange(rule.num_mixed_networks, dtype=loss.dtype) * loss, dim=0)
    return torch.cat([(0.5 * loss).reshape(1), mixing])


def loss_kwargs(rule, loss) -> dict[str, torch.Tensor]:
    """``{"loss": loss}`` for rules that need the training loss (``needs_loss``); for scheduled rules
    ``{"control": row}`` (their per-tensor update takes the scheduler's output instead); else nothing."""
    loss = torch.as_tensor(loss, dtype=torch.float32)
    if rule.scheduled:
        return {"control": control_from(rule, loss)}
    return {"loss": loss} if rule.needs_loss else {}


def update_with_loss(rule):
    """``rule.update`` taking the loss positionally (vmap batches positional arguments only)."""
    def update(theta, param, grad, state, step, chunk_size, loss):
        return rule.update(theta, param, grad, state, step, chunk_size, **loss_kwargs(rule, loss))
    return update


def updated_keys(rule, state: dict[str, torch.Tensor]) -> set[str]:
    """The state keys ``update`` returns: all but those a scheduled rule's ``schedule`` advances."""
    return set(state) - set(rule.schedule_tensor_keys)


def warm_state(rule, theta, param: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A non-trivial state: the rule's own state after one step on a random gradient."""
    initial = rule.init_state(param)
    _, state = rule.update(theta, param, torch.randn(param.shape, generator=gen), initial, 0,
                           **loss_kwargs(rule, 2.3))
    return {**initial, **state}


def perturbed_theta(rule, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # Non-zero biases and offsets so that every meta-parameter matters.
    theta = rule.init_theta(gen)
    return {key: value + 0.05 * torch.randn(value.shape, generator=gen) for key, value in theta.items()}


def stack(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([d[key] for d in dicts]) for key in dicts[0]}


def test_rules_registered() -> None:
    assert {"per_param_mlp", "mlp_lopt", "small_fc_lopt"} <= set(RULES)


@pytest.mark.parametrize("rule_name", RULES)
def test_init_theta_deterministic_and_shaped(rule_name: str) -> None:
    rule = small_rule(rule_name)
    first = rule.init_theta(torch.Generator().manual_seed(3))
    again = rule.init_theta(torch.Generator().manual_seed(3))
    other = rule.init_theta(torch.Generator().manual_seed(4))
    assert {key: tuple(value.shape) for key, value in first.items()} == rule.theta_shapes()
    assert all(value.dtype == torch.float32 for value in first.values())
    for key in first:
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=0)
    assert any(not torch.equal(first[key], other[key]) for key in first)
    assert all(torch.isfinite(value).all() for value in first.values())


@pytest.mark.parametrize("rule_name", RULES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("grad_enabled, chunk_size", [(True, None), (False, None), (False, 7)])
def test_vmap_equals_loop(rule_name: str, shape: tuple[int, ...], grad_enabled: bool, chunk_size: int | None) -> None:
    # No-grad vmap is what evolution-strategies meta-training runs; chunks are the deployment path.
    rule = small_rule(rule_name)
    gen = torch.Generator().manual_seed(1)
    thetas = [perturbed_theta(rule, gen) for _ in range(BATCH)]
    params = [0.1 * torch.randn(shape, generator=gen) for _ in range(BATCH)]
    grads = [torch.randn(shape, generator=gen) * scale for scale in (1e-2, 1.0, 1e3)]
    states = [warm_state(rule, theta, param, gen) for theta, param in zip(thetas, params)]
    steps = torch.tensor([0, 3, 250])
    losses = torch.tensor([0.5, 2.0, 7.0])

    with torch.set_grad_enabled(grad_enabled):
        batched_step, batched_state = vmap(update_with_loss(rule), in_dims=(0, 0, 0, 0, 0, None, 0))(
            stack(thetas), torch.stack(params), torch.stack(grads), stack(states), steps, chunk_size, losses)
    for i in range(BATCH):
        step, state = rule.update(thetas[i], params[i], grads[i], states[i], int(steps[i]),
                                  **loss_kwargs(rule, losses[i]))
        torch.testing.assert_close(batched_step[i], step, rtol=1e-5, atol=1e-6 * step.abs().max().item() + 1e-12)
        assert set(batched_state) == set(state) == updated_keys(rule, states[i])
        for key in state:
            torch.testing.assert_close(batched_state[key][i], state[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule_name", RULES)
def test_step_int_or_tensor(rule_name: str) -> None:
    rule = small_rule(rule_name)
    gen = torch.Generator().manual_seed(2)
    theta = perturbed_theta(rule, gen)
    param, grad = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    state = warm_state(rule, theta, param, gen)
    from_int, _ = rule.update(theta, param, grad, state, 42, **loss_kwargs(rule, 1.5))
    for step in (torch.tensor(42), torch.tensor(42.0)):
        from_tensor, _ = rule.update(theta, param, grad, state, step, **loss_kwargs(rule, 1.5))
        torch.testing.assert_close(from_tensor, from_int, rtol=0, atol=0)


@pytest.mark.parametrize("rule_name", RULES)
def test_grad_wrt_theta_matches_finite_differences(rule_name: str) -> None:
    rule = small_rule(rule_name)
    gen = torch.Generator().manual_seed(5)
    theta32 = perturbed_theta(rule, gen)
    param32 = 0.1 * torch.randn(6, 5, generator=gen)
    state32 = warm_state(rule, theta32, param32, gen)
    theta = {key: value.double() for key, value in theta32.items()}
    param = param32.double()
    grad = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    state = {key: value.double() for key, value in state32.items()}
    weights = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    state_weights = {key: torch.randn(value.shape, generator=gen, dtype=torch.float64) for key, value in state.items()}
    extra = {key: value.double() for key, value in loss_kwargs(rule, 1.7).items()}

    def update(theta_: dict[str, torch.Tensor]):
        if not rule.scheduled:
            return rule.update(theta_, param, grad, state, 11, **extra)
        # a scheduled rule: its whole-model phase (one tensor here) feeds the per-tensor update
        schedule_state = {key: value.double() for key, value in rule.init_schedule_state(40).items()}
        rows = {key: state[key].unsqueeze(0) for key in rule.schedule_tensor_keys}
        summary = rule.tensor_summary(param, grad, state).unsqueeze(0)
        control, _, new_rows = rule.schedule(theta_, schedule_state, rows, summary, torch.tensor([0]),
                                             torch.tensor(1.7, dtype=torch.float64))
        step, new_state = rule.update(theta_, param, grad, state, 11, control=control[0])
        return step, {**new_state, **{key: value[0] for key, value in new_rows.items()}}

    # The update is ~step_mult small and state entries are O(1): weight both to matter equally.
    base_step, base_state = update(theta)
    step_scale = 1.0 / base_step.abs().max().clamp_min(1e-30)
    state_scales = {key: 1.0 / value.abs().max().clamp_min(1e-30) for key, value in base_state.items()}

    def loss(theta_: dict[str, torch.Tensor]) -> torch.Tensor:
        step, new_state = update(theta_)
        total = (step * weights).sum() * step_scale
        for key, value in new_state.items():
            total = total + (value * state_weights[key]).sum() * state_scales[key]
        return total

    analytic = func_grad(loss)(theta)
    assert set(analytic) == set(theta)
    assert all(torch.isfinite(value).all() for value in analytic.values())
    assert any(value.abs().max() > 0 for value in analytic.values())
    eps = 1e-6
    for key, value in analytic.items():
        if value.abs().max() == 0:
            continue  # e.g. a weight row fed by an all-zero input
        index = int(value.abs().argmax())
        plus = {k: v.clone() for k, v in theta.items()}
        minus = {k: v.clone() for k, v in theta.items()}
        plus[key].view(-1)[index] += eps
        minus[key].view(-1)[index] -= eps
        numeric = (loss(plus) - loss(minus)) / (2 * eps)
        torch.testing.assert_close(value.reshape(-1)[index], numeric, rtol=1e-4, atol=1e-8, msg=key)


@pytest.mark.parametrize("rule_name", RULES)
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_update_does_not_mutate_inputs(rule_name: str, chunk_size: int | None) -> None:
    rule = small_rule(rule_name)
    gen = torch.Generator().manual_seed(6)
    theta = perturbed_theta(rule, gen)
    param, grad = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)
    state = warm_state(rule, theta, param, gen)
    step = torch.tensor(9)
    copies = [{k: v.clone() for k, v in d.items()} for d in (theta, state)] + [param.clone(), grad.clone(),
                                                                               step.clone()]
    update, new_state = rule.update(theta, param, grad, state, step, chunk_size=chunk_size,
                                    **loss_kwargs(rule, 0.7))
    for before, after in zip(copies, [theta, state, param, grad, step]):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert update.shape == param.shape
    assert set(new_state) == updated_keys(rule, state)
    for key in new_state:
        assert new_state[key].shape == state[key].shape
        assert new_state[key].data_ptr() != state[key].data_ptr()


@pytest.mark.parametrize("shape", [(), (10,), (7, 5), (3, 4, 5), (2, 1, 30), (3, 4000)])
@pytest.mark.parametrize("chunk_size", [None, 1, 6, 13, 4096])
def test_chunk_indices_cover_tensor_in_order(shape: tuple[int, ...], chunk_size: int | None) -> None:
    values = torch.arange(torch.Size(shape).numel()).reshape(shape)
    pieces = chunk_indices(shape, chunk_size)
    assert torch.equal(torch.cat([values[index].reshape(-1) for index in pieces]), values.reshape(-1))
    if chunk_size is not None:
        assert all(values[index].numel() <= chunk_size for index in pieces)


@pytest.mark.parametrize("shape", [(10,), (7, 5), (3, 4, 5), (2, 1, 30), (3, 4000)])
@pytest.mark.parametrize("chunk_size", [None, 1, 6, 13, 4096])
def test_chunk_indices_keep_trailing_axes_whole(shape: tuple[int, ...], chunk_size: int | None) -> None:
    """Celo2's pieces: the last axis is never split; otherwise pieces stay within chunk_size."""
    values = torch.arange(torch.Size(shape).numel()).reshape(shape)
    pieces = chunk_indices(shape, chunk_size, whole_trailing_axes=1)
    assert torch.equal(torch.cat([values[index].reshape(-1) for index in pieces]), values.reshape(-1))
    for index in pieces:
        assert values[index].shape[-1] == shape[-1]
        if chunk_size is not None:
            assert values[index].numel() <= max(chunk_size, shape[-1])
