"""Celo2's deployment kernel computes the rule's own math: in-place buffers, prepared weights,
blocked Newton–Schulz, column-major state, stacks — each equal to the reference ``Celo2.update``."""

from __future__ import annotations

import pytest
import torch

from lopt_hf.kernels import kernel_for
from lopt_hf.kernels.celo2 import Celo2Kernel, symmetric_product
from lopt_hf.rules.celo2 import Celo2, newton_schulz
from support import STACK_SHAPES

NS = ((3.4445, -4.7750, 2.0315), 5, 1e-8)


def perturbed_theta(rule: Celo2, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in rule.init_theta(gen).items()}


def test_celo2_gets_its_kernel() -> None:
    rule = Celo2()
    assert isinstance(kernel_for(rule, rule.init_theta()), Celo2Kernel)


def test_blocked_newton_schulz_matches() -> None:
    # Deployment computes the symmetric products of large Gram matrices as three half-size blocks.
    gen = torch.Generator().manual_seed(4)
    for shape in [(512, 700), (900, 600), (513, 513)]:
        x = torch.randn(shape, generator=gen)
        reference = newton_schulz(x.double(), *NS)
        for product in (None, symmetric_product):
            result = newton_schulz(x, *NS, symmetric_product=product)
            torch.testing.assert_close(result.double(), reference, rtol=0, atol=5e-6)


def test_blocked_newton_schulz_batched_and_finer_blocks_match() -> None:
    # the symmetric block products also run on a batch of matrices (stacked tensors), and a Gram
    # side ≥ 1024 is cut into ≥ 4 blocks (uneven here)
    gen = torch.Generator().manual_seed(6)
    for x in (torch.randn(3, 520, 600, generator=gen), torch.randn(1030, 1100, generator=gen)):
        reference = newton_schulz(x.double(), *NS)
        result = newton_schulz(x, *NS, symmetric_product=symmetric_product)
        torch.testing.assert_close(result.double(), reference, rtol=0, atol=5e-6)


@pytest.mark.parametrize("orthogonalize", [False, True])
@pytest.mark.parametrize("shape", [(13, 29), (29, 13), (16, 16), (600, 530)])
def test_deployment_paths_agree(shape: tuple[int, int], orthogonalize: bool) -> None:
    """The kernel (in-place buffers, closed-form sums, column-major state for transposed views as
    LearnedOptimizer hands nn.Linear weights) gives the autograd path's result."""
    rule = Celo2(orthogonalize=orthogonalize)
    theta = perturbed_theta(rule, 5)
    kernel = kernel_for(rule, theta)
    gen = torch.Generator().manual_seed(5)
    param = torch.randn(shape, generator=gen)
    column_major = param.t().contiguous().t()
    reference_state, deployed_state = rule.init_state(param), kernel.init_state(column_major)
    assert not deployed_state["momentum"].is_contiguous() and deployed_state["momentum"].mT.is_contiguous()
    for step in range(3):
        grad = torch.randn(shape, generator=gen) * (1e3 if step == 1 else 1e-2)
        expected, reference_state = rule.update(theta, param, grad, reference_state, step)
        with torch.no_grad():
            got, (deployed_state,) = kernel.update_stack(column_major[None], grad.t().contiguous().t()[None],
                                                         [deployed_state], step, chunk_size=4096)
        torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=3e-5)
        for key, value in reference_state.items():
            torch.testing.assert_close(deployed_state[key], value, rtol=1e-5, atol=1e-7)
        assert deployed_state["momentum"].mT.is_contiguous()  # the state keeps its memory order
        param = param - 0.01 * expected
        column_major = param.t().contiguous().t()


@pytest.mark.parametrize("orthogonalize", [False, True])
@pytest.mark.parametrize("shape", STACK_SHAPES)
def test_kernel_stack_is_each_tensors_update(shape: tuple[int, ...], orthogonalize: bool) -> None:
    """A stack through the kernel (no_grad, chunked) == each tensor through the kernel alone == the
    reference rule: every statistic stays per tensor."""
    rule = Celo2(orthogonalize=orthogonalize)
    theta = perturbed_theta(rule, 11)
    kernel = kernel_for(rule, theta)
    gen = torch.Generator().manual_seed(11)
    stack = 3
    params = torch.randn(stack, *shape, generator=gen)
    stacked_states = [kernel.init_state(params[i]) for i in range(stack)]
    single_states = [kernel.init_state(params[i]) for i in range(stack)]
    reference_states = [rule.init_state(params[i]) for i in range(stack)]
    scales = torch.tensor([1e-2, 1.0, 1e3]).view(stack, *([1] * len(shape)))
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if orthogonalize else {"rtol": 1e-5, "atol": 1e-6}
    for step in range(3):
        grads = torch.randn(stack, *shape, generator=gen) * scales
        with torch.no_grad():
            stacked, stacked_states = kernel.update_stack(params, grads, stacked_states, step, chunk_size=4096)
            singles = []
            for i in range(stack):
                update, (single_states[i],) = kernel.update_stack(params[i][None], grads[i][None], [single_states[i]],
                                                                  step, chunk_size=4096)
                singles.append(update[0])
        references = []
        for i in range(stack):
            update, reference_states[i] = rule.update(theta, params[i], grads[i], reference_states[i], step)
            references.append(update)
        assert stacked.shape == params.shape
        torch.testing.assert_close(stacked, torch.stack(singles), **tolerance)
        torch.testing.assert_close(stacked, torch.stack(references), **tolerance)
        for i in range(stack):
            for key, value in single_states[i].items():  # (vs the reference: test_deployment_paths_agree)
                torch.testing.assert_close(stacked_states[i][key], value, rtol=1e-6, atol=0)
        params = params - 0.01 * stacked


def test_prepared_weights_follow_in_place_changes_of_theta() -> None:
    rule = Celo2()
    theta = perturbed_theta(rule, 3)
    kernel = kernel_for(rule, theta)
    gen = torch.Generator().manual_seed(3)
    param, grad = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen)
    with torch.no_grad():
        before, _ = kernel.update_stack(param[None], grad[None], [kernel.init_state(param)], 0)
        theta["w2"].mul_(-1.0)
        after, _ = kernel.update_stack(param[None], grad[None], [kernel.init_state(param)], 0)
    expected, _ = rule.update(theta, param, grad, rule.init_state(param), 0)
    torch.testing.assert_close(after[0], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("orthogonalize", [False, True])
@pytest.mark.parametrize("shape, column_major", [((37,), False), ((), False), ((130, 70), False), ((130, 70), True),
                                                 ((70, 130), True), ((2, 3, 40, 9), False), ((3, 3, 4, 8), False),
                                                 ((600, 530), False)])
def test_in_place_path_is_the_deployment_path(shape: tuple[int, ...], column_major: bool, orthogonalize: bool,
                                              monkeypatch) -> None:
    """Large stacks (here: every stack) advance momentum and rms in the state handed in and build g, g², rsqrt(rms)
    per piece: the same arithmetic as the buffered path. (Bits may differ where a matrix product reads a piece at
    another memory offset — sgemm blocks by alignment — as on the 600×530 matrix, and in Newton–Schulz, which
    the in-place path iterates in the step's own memory order.)"""
    from lopt_hf.kernels import in_place

    rule = Celo2(orthogonalize=orthogonalize)
    theta = perturbed_theta(rule, 12)
    runs = []
    for threshold in (0, 1 << 40):
        monkeypatch.setattr(in_place, "IN_PLACE_MIN_NUMEL", threshold)
        kernel = kernel_for(rule, theta)
        gen = torch.Generator().manual_seed(13)
        param = torch.randn(shape, generator=gen)
        param = param.t().contiguous().t() if column_major else param
        state = kernel.init_state(param)
        if column_major:
            assert all(value.mT.is_contiguous() for key, value in state.items() if key in ("momentum", "rms"))
        directions = []
        for step in range(3):
            grad = torch.randn(shape, generator=gen) * (2e3 if step == 1 else 1e-2)  # step 1: beyond grad_clip
            grad = grad.t().contiguous().t() if column_major else grad
            kept = dict(state)
            with torch.no_grad():
                direction, (state,) = kernel.update_stack(param[None], grad[None], [state], step, chunk_size=1000)
            if threshold == 0:
                assert all(state[key].data_ptr() == kept[key].data_ptr() for key in ("momentum", "rms"))
            directions.append(direction[0].clone())
            param = param - 0.01 * direction[0]
        runs.append((directions, {key: value.clone() for key, value in state.items()}))
    (in_place_directions, in_place_state), (buffered_directions, buffered_state) = runs
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if orthogonalize else {"rtol": 1e-5, "atol": 1e-6}
    for got, expected in zip(in_place_directions, buffered_directions):
        torch.testing.assert_close(got, expected, **tolerance)
    if shape != (600, 530) and not orthogonalize:
        assert all(torch.equal(got, expected) for got, expected in zip(in_place_directions, buffered_directions))
    for key, value in buffered_state.items():
        torch.testing.assert_close(in_place_state[key], value, rtol=1e-6, atol=0)
