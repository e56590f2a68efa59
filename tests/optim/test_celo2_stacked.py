"""LearnedOptimizer runs Celo2 on stacks of same-shape tensors: the same steps as one tensor at a time.

A transformer repeats its blocks, so most of its tensors come in groups of one shape; Celo2's
kernel takes such a group in one call (see ``tests/rules/test_rule_celo2.py`` and
``tests/kernels/test_celo2_kernel.py`` for the rule- and kernel-level equality). These tests pin down the optimizer around it: grouping, skipped non-finite tensors inside
a stack, checkpoints of stacked state, bf16 parameters, the foreach AdamW route.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from lopt_hf.layout import CONV, LINEAR, from_rule_layout, to_rule_layout
from lopt_hf.load import load_lopt
from lopt_hf.optim import LearnedOptimizer
from lopt_hf.rules.celo2 import Celo2
from support import RepeatedBlocks

LR = 0.01


def set_grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for param in model.parameters():
        scale = 1e3 if step == 2 else 1e-2  # step 2: clipped to ±1000 by the rule
        param.grad = (torch.randn(param.shape, generator=gen) * scale).to(param.dtype)


class PerTensor(Celo2):
    """Celo2 not stacked: LearnedOptimizer (through Celo2's kernel) steps one tensor at a time."""

    stackable = False


class Recording(Celo2):
    """Celo2 that records how many tensors each stacked call of its kernel gets."""

    stackable = True

    def update_decay_first(self, theta, params, grads, states, step, chunk_size=None, workspace=None):  # noqa: ANN001, ANN201
        self.__dict__.setdefault("stack_sizes", []).append(params.shape[0])
        return super().update_decay_first(theta, params, grads, states, step, chunk_size, workspace)


def optimizer(folder: Path, model: nn.Module, rule_class: type[Celo2] | None = None, **kwargs) -> LearnedOptimizer:
    opt = load_lopt(folder, model, lr=LR, **kwargs)
    if rule_class is not None:
        opt.rule = rule_class.from_hyperparameters(opt.rule.hyperparameters())
    return opt


@pytest.mark.parametrize("variant", ["celo2", "celo2-base"])
def test_stacked_steps_equal_per_tensor_steps(celo2_folders, variant: str) -> None:
    stacked_model, single_model = RepeatedBlocks(), RepeatedBlocks()
    stacked = optimizer(celo2_folders[variant], stacked_model, Recording, weight_decay=0.1)
    single = optimizer(celo2_folders[variant], single_model, PerTensor, weight_decay=0.1)
    for step in range(4):
        set_grads(stacked_model, step)
        set_grads(single_model, step)
        stacked.step()
        single.step()
        for (name, a), b in zip(stacked_model.named_parameters(), single_model.parameters()):
            tolerance = {"rtol": 1e-4, "atol": 1e-6} if variant == "celo2" else {"rtol": 1e-5, "atol": 1e-7}
            torch.testing.assert_close(a, b, **tolerance, msg=f"step {step}, {name}")
    for param, twin in zip(stacked_model.parameters(), single_model.parameters()):
        for key, value in stacked.state[param].items():
            expected = single.state[twin][key]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7, msg=key)
            else:
                assert value == expected
    stats, expected_stats = stacked.last_step_stats(), single.last_step_stats()
    assert stats.keys() == expected_stats.keys()
    for key, value in stats.items():
        assert value == pytest.approx(expected_stats[key], rel=1e-4)
    # the same-shape tensors really went through the rule together: e.g. the three up weights (and,
    # for celo2-base, the eleven vectors of length 12: norm weights and biases, down and conv biases)
    sizes = stacked.rule.stack_sizes[-len(stacked.rule.stack_sizes) // 4:]
    assert max(sizes) == (3 if variant == "celo2" else 11) and sum(sizes) == sum(
        len(group["params"]) for group in stacked.param_groups if group["route"] == "learned")


def test_nonfinite_gradient_inside_a_stack_is_skipped_alone(celo2_folders) -> None:
    model, reference = RepeatedBlocks(), RepeatedBlocks()
    opt, reference_opt = optimizer(celo2_folders["celo2-base"], model), optimizer(celo2_folders["celo2-base"], reference)
    for step in range(2):
        for m, o in ((model, opt), (reference, reference_opt)):
            set_grads(m, step)
            o.step()
    poisoned = model.blocks[1]["up"].weight
    before = poisoned.detach().clone()
    state_before = {key: value.clone() if isinstance(value, torch.Tensor) else value
                    for key, value in opt.state[poisoned].items()}
    set_grads(model, 5)
    set_grads(reference, 5)
    poisoned.grad[3, 4] = float("nan")
    reference.blocks[1]["up"].weight.grad = None  # the reference does not step that tensor at all
    opt.step()
    reference_opt.step()
    assert torch.equal(poisoned, before) and opt.num_skipped_nonfinite == 1
    assert opt.state[poisoned]["step"] == state_before["step"]
    for key, value in state_before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(opt.state[poisoned][key], value)
    for a, b in zip(model.parameters(), reference.parameters()):  # the rest of its stack stepped as usual
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the next step stacks the skipped tensor's old state with its neighbours' new state
    set_grads(model, 6)
    set_grads(reference, 6)
    reference.blocks[1]["up"].weight.grad = None
    opt.step()
    reference_opt.step()
    assert not torch.equal(poisoned, before)
    for name, (a, b) in zip(dict(model.named_parameters()), zip(model.parameters(), reference.parameters())):
        if a is not poisoned:
            assert torch.equal(a, b), name


def test_huge_finite_gradients_are_not_mistaken_for_nonfinite(celo2_folders) -> None:
    """The finite check's fast norm overflows for |g| ~ 1e30; such gradients are finite and the learned rule
    steps them. The AdamW route skips them (and counts them): g² would overflow its float32 second moment."""
    model = RepeatedBlocks()
    opt = optimizer(celo2_folders["celo2"], model)  # learned stacks and the AdamW route
    set_grads(model, 0)
    for param in model.parameters():
        param.grad = param.grad.sign() * 1e30
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    adamw = {id(p) for group in opt.param_groups if group["route"] == "adamw" for p in group["params"]}
    assert adamw and opt.num_skipped_nonfinite == len(adamw)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) if id(p) in adamw else not torch.equal(p, b)


@pytest.mark.parametrize("variant", ["celo2", "celo2-base"])
def test_checkpoint_of_stacked_state_resumes_bit_identically(celo2_folders, variant: str) -> None:
    reference = RepeatedBlocks()
    reference_opt = optimizer(celo2_folders[variant], reference)
    first = RepeatedBlocks()
    first_opt = optimizer(celo2_folders[variant], first)
    for step in range(6):
        set_grads(reference, step)
        reference_opt.step()
    for step in range(3):
        set_grads(first, step)
        first_opt.step()
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    size = buffer.tell()
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    # stacked state is stored as views of one tensor per stack: saved once, not once per view
    state_bytes = sum(v.numel() * v.element_size() for s in first_opt.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))
    param_bytes = sum(p.numel() * p.element_size() for p in first.parameters())
    assert size < 1.2 * (state_bytes + param_bytes) + 100_000
    resumed = RepeatedBlocks()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = optimizer(celo2_folders[variant], resumed)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    for step in range(3, 6):
        set_grads(resumed, step)
        resumed_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), reference.parameters()))


@pytest.mark.parametrize("variant", ["celo2", "celo2-base"])
def test_bfloat16_parameters_get_the_float32_step_rounded_once(celo2_folders, variant: str) -> None:
    low, high = RepeatedBlocks(torch.bfloat16), RepeatedBlocks()
    high.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    low_opt, high_opt = optimizer(celo2_folders[variant], low), optimizer(celo2_folders[variant], high)
    for step in range(2):
        set_grads(low, step)
        for a, b in zip(high.parameters(), low.parameters()):
            a.grad = b.grad.float()
        low_opt.step()
        high_opt.step()
        for a, b in zip(low.parameters(), high.parameters()):
            assert a.dtype == torch.bfloat16
            assert torch.equal(a, b.to(torch.bfloat16))
        high.load_state_dict({k: v.float() for k, v in low.state_dict().items()})  # continue from the rounded weights
    for state in low_opt.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if isinstance(v, torch.Tensor))


def test_stacked_layout_maps_match_per_tensor_maps() -> None:
    weights = torch.randn(3, 8, 4, 3, 5)
    for layout in (CONV, LINEAR):
        stack = weights if layout == CONV else weights[:, :, :, 0, 0]
        mapped = to_rule_layout(stack, layout, stacked=True)
        for i in range(3):
            assert torch.equal(mapped[i], to_rule_layout(stack[i], layout))
        assert torch.equal(from_rule_layout(mapped, layout, stacked=True), stack)


def test_plain_update_rule_call_still_works_on_one_tensor() -> None:
    """update() is update_stacked on a stack of one (what the meta-trainer and the reference tests call)."""
    rule = Celo2(orthogonalize=True)
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    param, grad = torch.randn(6, 10), torch.randn(6, 10)
    state = rule.init_state(param)
    update, new_state = rule.update(theta, param, grad, state, 0)
    stacked, stacked_state = rule.update_stacked(
        theta, param[None], grad[None], {k: v[None] for k, v in state.items()}, 0)
    assert torch.equal(update, stacked[0])
    assert all(torch.equal(new_state[k], stacked_state[k][0]) for k in new_state)
