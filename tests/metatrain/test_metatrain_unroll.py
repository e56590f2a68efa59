"""Vectorised inner training: batched steps equal per-problem steps; the compiled path equals eager."""

from __future__ import annotations

import pytest
import torch

from lopt_hf.metatrain.tasks import MLPImageTaskFamily
from lopt_hf.rules.features import skinny_matmul
from lopt_hf.metatrain.unroll import (SKINNY_DECOMPOSITIONS, VectorizedInnerTrainer, inner_step_matmul, narrow_matmul,
                                      run_unroll)
from lopt_hf.rules import build_rule

MEMBERS = 4


@pytest.fixture(scope="module")
def family() -> MLPImageTaskFamily:
    return MLPImageTaskFamily(hidden_sizes=(8,), batch_size=6, param_scale_range=(0.5, 2.0))


def make_problems(family, trainer, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tasks = [family.sample_task(generator) for _ in range(MEMBERS)]
    params = [family.init_params(task, generator) for task in tasks]
    batches = [family.sample_batches(task, generator, 3) for task in tasks]
    batch = {key: torch.stack([item[key] for item in batches], dim=1) for key in batches[0]}  # (T, M, ...)
    return trainer.init_problems(tasks, params), batch


def member_thetas(rule, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    theta = rule.init_theta(generator)
    return {key: value + 0.05 * torch.randn((MEMBERS, *value.shape), generator=generator)
            for key, value in theta.items()}


@pytest.mark.parametrize("shape_a, shape_b", [((5, 3), (3, 7)), ((2, 9, 4), (2, 4, 65)), ((2, 11, 65), (2, 65, 2)),
                                              ((3, 1), (1, 4)), ((2, 5, 20), (2, 20, 9))])
def test_skinny_matmul_equals_matmul(shape_a, shape_b) -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(shape_a, generator=generator), torch.randn(shape_b, generator=generator)
    out = skinny_matmul(a, b)
    if shape_a[-1] > 8 and shape_b[-1] > 4:
        assert out is NotImplemented  # a regular matmul stays a BLAS call
    else:
        torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)
    assert set(SKINNY_DECOMPOSITIONS) == {torch.ops.aten.mm.default, torch.ops.aten.bmm.default}


@pytest.mark.parametrize("shape_a, shape_b, narrow", [
    ((3, 128, 64), (3, 64, 10), True),  # a task model's output layer under vmap
    ((3, 64, 128), (3, 128, 10), True),  # its weight gradient (xᵀ @ dlogits)
    ((200, 33), (33, 15), True),  # 2-D
    ((3, 128, 64), (3, 64, 16), False),  # 16 columns: BLAS is as fast as written
    ((3, 12, 64), (3, 64, 10), False),  # fewer rows than 16: the transpose would be narrow too
    ((3, 10, 64), (3, 64, 128), False),  # the transposed form itself: no recursion
])
def test_narrow_matmul_equals_matmul(shape_a, shape_b, narrow: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(shape_a, generator=generator), torch.randn(shape_b, generator=generator)
    out = narrow_matmul(a, b)
    if not narrow:
        assert out is NotImplemented
        return
    torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inner_step_matmul(a, b), a @ b, rtol=1e-5, atol=1e-5)  # not skinny: narrow


@pytest.mark.parametrize("rule_name", ["per_param_mlp", "mlp_lopt"])
@pytest.mark.parametrize("theta_batched", [True, False])
def test_batched_step_equals_per_problem_steps(family, rule_name: str, theta_batched: bool) -> None:
    rule = build_rule(rule_name)
    trainer = VectorizedInnerTrainer(family, rule, compile=False)
    problems, batch = make_problems(family, trainer)
    thetas = member_thetas(rule)
    theta = thetas if theta_batched else {key: value[0] for key, value in thetas.items()}
    with torch.no_grad():
        losses, final = run_unroll(trainer, theta, problems, lambda t: {k: v[t] for k, v in batch.items()}, 3)
    assert losses.shape == (3, MEMBERS) and torch.equal(final.step, torch.full((MEMBERS,), 3))
    for member in range(MEMBERS):
        # The plain single-problem loop: the family's loss, autograd, the rule's update.
        own_theta = {key: value[member] for key, value in thetas.items()} if theta_batched else theta
        task = {key: value[member] for key, value in problems.task.items()}
        params = {key: value[member] for key, value in problems.params.items()}
        state = {name: rule.init_state(value) for name, value in params.items()}
        for t in range(3):
            step_batch = {key: value[t, member] for key, value in batch.items()}
            params = {key: value.detach().requires_grad_() for key, value in params.items()}
            loss = family.loss(params, task, step_batch)
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
            torch.testing.assert_close(losses[t, member], loss.detach(), rtol=1e-5, atol=1e-6)
            new_params = {}
            with torch.no_grad():
                for name, value in params.items():
                    delta, state[name] = rule.update(own_theta, value, grads[name], state[name], t)
                    new_params[name] = value - delta
            params = new_params
        for name, value in params.items():
            torch.testing.assert_close(final.params[name][member], value, rtol=1e-5, atol=1e-6)
            for key, entry in state[name].items():
                torch.testing.assert_close(final.opt_state[name][key][member], entry, rtol=1e-5, atol=1e-6)


def test_before_step_hook_and_select(family) -> None:
    rule = build_rule("per_param_mlp")
    trainer = VectorizedInnerTrainer(family, rule, compile=False)
    problems, batch = make_problems(family, trainer)
    fresh, _ = make_problems(family, trainer, seed=5)
    mask = torch.tensor([False, True, False, True])

    def before_step(t, current):
        return current.select(mask, fresh) if t == 2 else current

    theta = {key: value[0] for key, value in member_thetas(rule).items()}
    with torch.no_grad():
        _, final = run_unroll(trainer, theta, problems, lambda t: {k: v[t] for k, v in batch.items()}, 3, before_step)
    assert final.step.tolist() == [3, 1, 3, 1]  # members 1 and 3 restarted before step 2
    assert torch.equal(final.task["dataset"], problems.task["dataset"])
    torch.testing.assert_close(final.task["scale/w0"][1], fresh.task["scale/w0"][1])


@pytest.mark.slow
def test_compiled_step_equals_eager(family) -> None:
    rule = build_rule("per_param_mlp")
    eager = VectorizedInnerTrainer(family, rule, compile=False)
    compiled = VectorizedInnerTrainer(family, rule, compile=True)
    problems, batch = make_problems(family, eager)
    step_batch = {key: value[0] for key, value in batch.items()}
    thetas = member_thetas(rule)
    with torch.no_grad():  # the ES/PES path (the rule rectifies in place)
        loss_e, after_e = eager.step(thetas, problems, step_batch)
        loss_c, after_c = compiled.step(thetas, problems, step_batch)
        _, twice_e = eager.step(thetas, after_e, step_batch)
        _, twice_c = compiled.step(thetas, after_c, step_batch)  # cached: no second compilation
    assert len(compiled._compiled) == 1 and all(len(graphs) == 1 for graphs in compiled._compiled.values())
    torch.testing.assert_close(loss_c, loss_e)
    for name in after_e.params:
        torch.testing.assert_close(after_c.params[name], after_e.params[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(twice_c.params[name], twice_e.params[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(after_c.opt_state[name]["momentum"], after_e.opt_state[name]["momentum"])


def test_autograd_steps_run_eagerly_even_when_compiling(family) -> None:
    # BPTT differentiates through the step: the compiled path is for no-grad (ES/PES) steps only.
    rule = build_rule("per_param_mlp")
    eager = VectorizedInnerTrainer(family, rule, compile=False)
    compiled = VectorizedInnerTrainer(family, rule, compile=True)
    problems, batch = make_problems(family, eager)
    step_batch = {key: value[0] for key, value in batch.items()}
    theta = {key: value[0] for key, value in member_thetas(rule).items()}

    def meta_grad(trainer):
        leaves = {key: value.clone().requires_grad_() for key, value in theta.items()}
        _, after = trainer.step(leaves, problems, step_batch)
        loss, _ = trainer.step(leaves, after, step_batch)
        return torch.autograd.grad(loss.sum(), list(leaves.values()))

    for grad_c, grad_e in zip(meta_grad(compiled), meta_grad(eager)):
        assert torch.equal(grad_c, grad_e)
    assert not compiled._compiled
