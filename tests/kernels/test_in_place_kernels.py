"""The in-place kernels of small_fc_lopt, mlp_lopt, per_param_mlp and of the scheduled celo, velo, celo_adam equal
the rules' own ``update`` bit for bit — shapes 0-d to 4-d, chunk sizes, several steps, stacks, a control row per
tensor — while advancing the state in place; through LearnedOptimizer the in-place path gives the same results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lopt_hf.kernels import RuleKernel, in_place, kernel_for
from lopt_hf.kernels.celo import CeloAdamKernel, CeloKernel
from lopt_hf.kernels.in_place import InPlaceKernel, MLPLOptKernel, PerParamMLPKernel, SmallFCLOptKernel
from lopt_hf.optim import LearnedOptimizer
from lopt_hf.rules import build_rule
from support import SMALL_RULE_CONFIGS

KERNELS = {"small_fc_lopt": SmallFCLOptKernel, "mlp_lopt": MLPLOptKernel, "per_param_mlp": PerParamMLPKernel}
# scheduled rules: their update takes the scheduler's control row (name suffixes mark other configs of a rule)
SCHEDULED = {"celo": CeloKernel, "velo": CeloKernel, "celo_adam": CeloAdamKernel,
             "celo_adam_param_scale": CeloAdamKernel, "celo_adam_orthogonalize": CeloAdamKernel}
CONFIGS = {"small_fc_lopt": {}, "mlp_lopt": {}, "per_param_mlp": {"hidden_sizes": [8, 8], "activation": "gelu"},
           "celo": {}, "velo": SMALL_RULE_CONFIGS["velo"], "celo_adam": {},
           "celo_adam_param_scale": {"param_scale_mult": True}, "celo_adam_orthogonalize": {"orthogonalize": True}}


@pytest.fixture(autouse=True)
def in_place_for_every_size(monkeypatch):
    """These tensors are small: make the kernels take their in-place path anyway (the one under test)."""
    monkeypatch.setattr(in_place, "IN_PLACE_MIN_NUMEL", 0)


@pytest.mark.parametrize("name", [*sorted(KERNELS), "celo", "velo"])
def test_the_per_element_networks_go_in_place_at_every_size(name: str) -> None:
    """small_fc_lopt, mlp_lopt, per_param_mlp, Celo and VeLO take the in-place path below IN_PLACE_MIN_NUMEL too
    (the state handed in is advanced, the result the rule's own), and the pieces' features and activations of the
    normalised networks go into the kernel's buffers: the same memory at the next step."""
    in_place.IN_PLACE_MIN_NUMEL = 1 << 22  # the module default (the autouse fixture restores its own value)
    rule, theta = rule_and_theta(name)
    kernel = kernel_for(rule, theta)
    param, grad = torch.randn(30, 20), torch.randn(30, 20)
    kwargs = control_kwargs(rule, torch.Generator().manual_seed(2))
    state = kernel.init_state(param)
    before = {key: value.clone() for key, value in state.items()}
    stacked = {key: value[None] for key, value in kwargs.items()}
    direction, (new_state,) = kernel.update_stack(param[None], grad[None], [state], 0, chunk_size=64, **stacked)
    with torch.no_grad():  # as the kernel runs it
        expected, expected_state = rule.update(theta, param, grad, before, 0, chunk_size=64, **kwargs)
    assert torch.equal(direction[0], expected)
    assert all(torch.equal(new_state[key], expected_state[key]) for key in expected_state)
    assert any(not torch.equal(state[key], before[key]) for key in state)  # advanced in place
    if name == "per_param_mlp":
        return  # its network runs on the rule's own feature matrix (no buffers)
    names = ("features", "hidden")
    pointers = [kernel.buffers.get(buffer, (1,), param).data_ptr() for buffer in names]
    kernel.update_stack(param[None], grad[None], [new_state], 1, chunk_size=64, **stacked)
    assert [kernel.buffers.get(buffer, (1,), param).data_ptr() for buffer in names] == pointers


def rule_and_theta(name: str, seed: int = 0):
    rule = build_rule(name.removesuffix("_param_scale").removesuffix("_orthogonalize"), **CONFIGS[name])
    gen = torch.Generator().manual_seed(seed)
    # perturbed decay offsets and biases: every theta entry matters
    return rule, {key: value + 0.05 * torch.randn(value.shape, generator=gen)
                  for key, value in rule.init_theta(gen).items()}


def control_kwargs(rule, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A scheduled rule's keyword for one tensor, as the scheduler emits it (``lr_mult``, then the mixing weights)."""
    return {"control": torch.rand(1 + rule.num_mixed_networks, generator=gen) + 0.5} if rule.scheduled else {}


@pytest.mark.parametrize("name", sorted(KERNELS | SCHEDULED))
def test_each_rule_gets_its_in_place_kernel(name: str) -> None:
    rule, theta = rule_and_theta(name)
    kernel = kernel_for(rule, theta)
    assert type(kernel) is (KERNELS | SCHEDULED)[name] and isinstance(kernel, InPlaceKernel)
    assert kernel.stacks == name.startswith("celo_adam")  # its update_stacked is batched
    assert not kernel.fused_subtract  # every one of them rounds lr·step first, as it always did


@pytest.mark.parametrize("name", sorted(KERNELS | SCHEDULED))
@pytest.mark.parametrize("shape", [(), (37,), (130, 70), (2, 3, 40, 9)])
@pytest.mark.parametrize("chunk_size", [None, 16, 1000])
def test_kernel_is_the_rule_bit_for_bit(name: str, shape: tuple[int, ...], chunk_size: int | None) -> None:
    rule, theta = rule_and_theta(name)
    if rule.scheduled and chunk_size == 16 and len(shape) > 1:
        chunk_size = 128  # (the same paths as 16, at a fraction of the Python overhead of Celo's features)
    kernel = kernel_for(rule, theta)
    gen = torch.Generator().manual_seed(1)
    param = torch.randn(shape, generator=gen)
    state = kernel.init_state(param)
    reference = {key: value.clone() for key, value in state.items()}
    for step in range(3):
        grad = torch.randn(shape, generator=gen) * (2e3 if step == 1 else 1e-2)  # step 1: beyond Celo's grad_clip
        kwargs = control_kwargs(rule, gen)
        with torch.no_grad():
            expected, new_reference = rule.update(theta, param, grad, reference, step, chunk_size, **kwargs)
        reference = {**reference, **new_reference}  # (a scheduled rule's LSTM rows are the optimizer's to advance)
        kept = {key: value for key, value in state.items()}
        got, (new_state,) = kernel.update_stack(param[None], grad[None], [state], step, chunk_size,
                                                **{key: value[None] for key, value in kwargs.items()})
        assert torch.equal(got[0], expected)
        assert new_state.keys() == new_reference.keys()
        for key, value in new_reference.items():
            assert torch.equal(new_state[key], value), key
            if key in ("momentum", "rms"):
                assert new_state[key] is kept[key]  # the full-size accumulators are advanced in place
        state = {**state, **new_state}
        param = param - 0.5 * expected


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_a_stack_is_each_tensor_on_its_own(name: str) -> None:
    rule, theta = rule_and_theta(name, seed=3)
    kernel = kernel_for(rule, theta)
    gen = torch.Generator().manual_seed(4)
    params, grads = torch.randn(3, 9, 11, generator=gen), torch.randn(3, 9, 11, generator=gen) * 1e-2
    states = [kernel.init_state(params[i]) for i in range(3)]
    references = [{key: value.clone() for key, value in state.items()} for state in states]
    for step in range(2):
        got, new_states = kernel.update_stack(params, grads, states, step, chunk_size=20)
        for i in range(3):
            with torch.no_grad():  # (deployment's arithmetic: the rule reduces differently under autograd)
                expected, references[i] = rule.update(theta, params[i], grads[i], references[i], step, chunk_size=20)
            assert torch.equal(got[i], expected)
            assert all(torch.equal(new_states[i][key], value) for key, value in references[i].items())
        states = new_states


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_a_non_contiguous_state_is_replaced_not_written_through(name: str) -> None:
    rule, theta = rule_and_theta(name)
    kernel = kernel_for(rule, theta)
    gen = torch.Generator().manual_seed(5)
    param, grad = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    state = {key: torch.randn(value.mT.shape if value.dim() >= 2 else value.shape, generator=gen).mT
             if value.dim() >= 2 else torch.randn(value.shape, generator=gen) for key, value in
             kernel.init_state(param).items()}
    state = {key: value.abs() for key, value in state.items()}  # second moments are non-negative
    before = {key: value.clone() for key, value in state.items()}
    with torch.no_grad():
        expected, expected_state = rule.update(theta, param, grad, before, 0, chunk_size=7)
    got, (new_state,) = kernel.update_stack(param[None], grad[None], [state], 0, chunk_size=7)
    # (reductions over a column-major accumulator sum in another order: equal up to rounding)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-9)
    for key, value in expected_state.items():
        torch.testing.assert_close(new_state[key], value, rtol=1e-6, atol=0)
        assert new_state[key].is_contiguous() or key not in ("momentum", "rms")  # (v_row/v_col: new tensors)
    for key, value in state.items():
        if not value.is_contiguous():
            assert torch.equal(value, before[key])  # left alone; the new state is a contiguous copy


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("lr", [1.0, 0.3])
def test_apply_step_rounds_as_the_per_tensor_kernel(name: str, lr: float) -> None:
    rule, theta = rule_and_theta(name)
    gen = torch.Generator().manual_seed(6)
    params, direction = torch.randn(1, 1100, 1000, generator=gen), torch.randn(1, 1100, 1000, generator=gen)
    expected = params.clone()
    RuleKernel(rule, theta).apply_step(expected, direction, lr)
    kernel_for(rule, theta).apply_step(params, direction, lr)
    assert torch.equal(params, expected)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_learned_optimizer_steps_as_the_rule(name: str) -> None:
    """Through LearnedOptimizer (weights, a bias, a 4-D tensor): each parameter moves by ``lr·update``."""
    rule, theta = rule_and_theta(name)
    torch.manual_seed(7)
    model = nn.ModuleDict({"linear": nn.Linear(40, 30), "conv": nn.Conv2d(3, 4, 3)})
    params = list(model.parameters())
    optimizer = LearnedOptimizer(params, rule, theta, lr=0.5, chunk_size=64)
    references = [rule.init_state(p) for p in params]
    for step in range(3):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        optimizer.step()
        for index, (p, old) in enumerate(zip(params, before)):
            with torch.no_grad():
                update, references[index] = rule.update(theta, old, p.grad, references[index], step, chunk_size=64)
            assert torch.equal(p.detach(), old - 0.5 * update)


@pytest.mark.parametrize("name", ["celo_adam"])
def test_small_tensors_take_the_scheduled_rules_own_update(name: str) -> None:
    in_place.IN_PLACE_MIN_NUMEL = 1 << 22  # the module default (the autouse fixture restores its own value)
    rule, theta = rule_and_theta(name)
    kernel = kernel_for(rule, theta)
    param, grad = torch.randn(30, 20), torch.randn(30, 20)
    state = kernel.init_state(param)
    before = {key: value.clone() for key, value in state.items()}
    kwargs = control_kwargs(rule, torch.Generator().manual_seed(2))
    kernel.update_stack(param[None], grad[None], [state], 0, chunk_size=64, control=kwargs["control"][None])
    assert all(torch.equal(state[key], before[key]) for key in state)  # the input state untouched


@pytest.mark.parametrize("name", ["celo", "celo_adam"])
def test_learned_optimizer_in_place_equals_the_functional_path(name: str, monkeypatch) -> None:
    """Weights, a bias and a conv kernel, three steps with the scheduler running: the in-place path
    (every tensor) and the rule's own update (no tensor) leave the same parameters and state."""
    rule, theta = rule_and_theta(name)
    results = []
    for threshold in (0, 1 << 40):
        monkeypatch.setattr(in_place, "IN_PLACE_MIN_NUMEL", threshold)
        monkeypatch.setattr(CeloKernel, "every_size", threshold == 0)  # Celo's kernel: in place at every size
        torch.manual_seed(7)
        model = nn.ModuleDict({"linear": nn.Linear(40, 30), "conv": nn.Conv2d(3, 4, 3)})
        optimizer = LearnedOptimizer(model.parameters(), rule, theta, lr=0.5, chunk_size=64)
        optimizer.set_total_steps(10)
        gen = torch.Generator().manual_seed(8)
        for step in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            optimizer.step(loss=torch.tensor(2.0 - 0.1 * step))
        results.append(([p.detach().clone() for p in model.parameters()], optimizer.state_dict()["state"]))
    (params_in_place, state_in_place), (params_rule, state_rule) = results
    assert all(torch.equal(a, b) for a, b in zip(params_in_place, params_rule))
    for index, state in state_rule.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(state_in_place[index][key], value), (index, key)
