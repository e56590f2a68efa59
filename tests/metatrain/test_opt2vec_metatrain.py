"""opt2vec is meta-trainable with the vectorised estimators: the loss reaches the rule, the
meta-gradient reaches its network, and a few PES meta-steps improve it."""

from __future__ import annotations

import pytest
import torch

from lopt_hf.metatrain.estimators import build_estimator
from lopt_hf.metatrain.tasks import MLPImageTaskFamily
from lopt_hf.rules import build_rule

ENCODER = ("w0", "b0", "w1", "b1")  # history -> embedding -> embedding: the network, not the heads


@pytest.fixture(scope="module")
def family() -> MLPImageTaskFamily:
    return MLPImageTaskFamily(datasets="digits", hidden_sizes=(8,), batch_size=32)


@pytest.fixture(scope="module")
def rule():
    return build_rule("opt2vec", history_length=4, embedding_dim=8, base_lr=0.01)


def initial_theta(rule, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {key: value.to(dtype) for key, value in rule.init_theta(torch.Generator().manual_seed(0)).items()}


def test_full_bptt_through_the_vectorised_trainer_matches_the_plain_loop(rule) -> None:
    """The trainer gives each member its own loss before the update, as LearnedOptimizer does."""
    family = MLPImageTaskFamily(datasets="digits", hidden_sizes=(4,), batch_size=8, dtype=torch.float64)
    estimator = build_estimator("full_bptt", family, rule, min_unroll=4, max_unroll=4, seed=3, compile=False)
    theta = initial_theta(rule, torch.float64)
    theta["w2"] = theta["w2"] * 50.0  # heads that listen to the embedding: every theta entry matters
    result = estimator.estimate(theta, {}, [0, 1], 0)

    leaves = {key: value.clone().requires_grad_() for key, value in theta.items()}
    total = 0.0
    for slot in (0, 1):  # the same trajectories, one problem at a time, loss passed as a keyword
        task, params, batches, length = trajectory(estimator, slot)
        state = {name: rule.init_state(value) for name, value in params.items()}
        params = {key: value.clone().requires_grad_() for key, value in params.items()}
        per_task = 0.0
        for t in range(length):
            loss = family.loss(params, task, {key: value[t] for key, value in batches.items()})
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            per_task = per_task + family.normalized_loss(loss)
            new_params = {}
            for (name, value), grad in zip(params.items(), grads):
                delta, state[name] = rule.update(leaves, value, grad, state[name], t, loss=loss)
                new_params[name] = value - delta
            params = new_params
        total = total + per_task / length
    expected = torch.autograd.grad(total, list(leaves.values()))
    torch.testing.assert_close(result.meta_loss_sum, total.detach())
    for key, grad in zip(leaves, expected):
        torch.testing.assert_close(result.grad_sum[key], grad, rtol=1e-6, atol=1e-10)
        assert grad.abs().max() > 0, key


def trajectory(estimator, slot: int):
    from lopt_hf.metatrain.estimators import slot_generator

    task, params, length = estimator._new_trajectory(slot_generator(estimator.seed, slot, 0, "trajectory"))
    batches = estimator.family.sample_batches(task, slot_generator(estimator.seed, slot, 0, "data"), length)
    return task, params, batches, length


def test_pes_meta_gradient_reaches_the_network(family, rule) -> None:
    estimator = build_estimator("pes", family, rule, truncation_length=5, min_unroll=10, max_unroll=20, std=0.01,
                                seed=0, compile=False)
    theta = initial_theta(rule)
    task_ids = list(range(4))
    state = estimator.init_state(theta, task_ids, 0)
    total = {key: torch.zeros_like(value) for key, value in theta.items()}
    for outer_step in range(3):
        result = estimator.estimate(theta, state, task_ids, outer_step)
        state = result.new_state
        assert torch.isfinite(result.meta_loss_sum)
        for key, value in result.grad_sum.items():
            assert torch.isfinite(value).all(), key
            total[key] += value
    for key in ENCODER + ("w2", "b2"):
        assert total[key].abs().max() > 0, key
        assert total[key].abs().mean() > 1e-6, key  # not a stray entry: the whole tensor gets signal


@pytest.mark.slow
def test_a_few_pes_meta_steps_reduce_the_meta_loss(family, rule) -> None:
    """Meta-loss = mean normalised training loss over 30-step runs of a fixed set of 16 tasks."""
    evaluator = build_estimator("es", family, rule, min_unroll=30, max_unroll=30, std=1e-4, seed=123, compile=False)

    def meta_loss(theta) -> float:  # same tasks, initialisations and batches for every theta
        return float(evaluator.estimate(theta, {}, list(range(16)), 0).meta_loss_sum) / 16

    theta = {key: value.clone().requires_grad_() for key, value in initial_theta(rule).items()}
    before = meta_loss({key: value.detach() for key, value in theta.items()})
    estimator = build_estimator("pes", family, rule, truncation_length=10, min_unroll=20, max_unroll=40, std=0.01,
                                seed=0, compile=False)
    optimizer = torch.optim.AdamW(theta.values(), lr=3e-2, weight_decay=0.0)
    task_ids = list(range(8))
    state = estimator.init_state({key: value.detach() for key, value in theta.items()}, task_ids, 0)
    start = {key: value.detach().clone() for key, value in theta.items()}
    for outer_step in range(60):
        result = estimator.estimate({key: value.detach() for key, value in theta.items()}, state, task_ids,
                                    outer_step)
        state = result.new_state
        optimizer.zero_grad()
        for key, value in theta.items():
            value.grad = result.grad_sum[key] / len(task_ids)
        optimizer.step()
    after = meta_loss({key: value.detach() for key, value in theta.items()})
    print(f"meta-loss over the fixed tasks: {before:.4f} -> {after:.4f}")
    assert after < 0.85 * before, (before, after)
    for key in ENCODER:  # the encoder was trained too, not only the head biases
        assert not torch.equal(theta[key].detach(), start[key]), key
