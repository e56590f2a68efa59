"""Meta-gradient estimators: exactness (BPTT), unbiasedness (ES, PES), state and sharding contracts."""

from __future__ import annotations

import io
import math

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lopt_hf.metatrain.estimators import (ESTIMATORS, EstimateResult, MetaGradientEstimator, build_estimator,
                                          slot_generator)
from lopt_hf.metatrain.tasks import LinearRegressionTaskFamily
from lopt_hf.rules import build_rule
from support import theta_for

ALL = sorted(ESTIMATORS)
TRUNCATED = ["pes", "truncated_bptt", "truncated_es"]


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[key].reshape(-1) for key in sorted(tensors)])


def test_build_estimator_names_and_options(image_family, small_rule) -> None:
    assert ALL == ["es", "full_bptt", "pes", "truncated_bptt", "truncated_es"]
    for name in ALL:
        estimator = build_estimator(name, image_family, small_rule, std=0.1, compile=False)
        assert isinstance(estimator, MetaGradientEstimator)
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        build_estimator("nope", image_family, small_rule)
    with pytest.raises(ValueError, match="truncation_lenght"):
        build_estimator("pes", image_family, small_rule, truncation_lenght=3)
    with pytest.raises(ValueError, match="min_unroll"):
        build_estimator("pes", image_family, small_rule, min_unroll=10, max_unroll=5)
    estimator = build_estimator("pes", image_family, small_rule, compile=False)
    with pytest.raises(ValueError, match="float64"):
        estimator.init_state(build_rule("per_param_mlp", hidden_sizes=(4,)).init_theta(), [0], 0)


# ----------------------------------------------------------------------------- exactness
def manual_trajectory_loss(family, rule, theta, task, params, batches, steps: int, state=None, first_step=0):
    """Mean normalised loss over ``steps`` inner steps, by the plain single-problem loop."""
    state = state or {name: rule.init_state(value) for name, value in params.items()}
    params = {key: value.detach().clone().requires_grad_() for key, value in params.items()}  # inner-grad leaves
    total = 0.0
    for t in range(steps):
        batch = {key: value[t] for key, value in batches.items()}
        loss = family.loss(params, task, batch)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        total = total + family.normalized_loss(loss)
        new_params = {}
        for (name, value), grad in zip(params.items(), grads):
            delta, state[name] = rule.update(theta, value, grad, state[name], first_step + t)
            new_params[name] = value - delta
        params = new_params
    return total / steps


def test_full_bptt_equals_autograd_through_the_plain_loop(image_family, small_rule) -> None:
    estimator = build_estimator("full_bptt", image_family, small_rule, min_unroll=3, max_unroll=7, seed=4,
                                compile=False)
    theta = theta_for(small_rule)
    result = estimator.estimate(theta, estimator.init_state(theta, [5, 6], 2), [5, 6], 2)
    assert result.new_state == {} and result.num_tasks == 2
    expected_grad, expected_loss = 0.0, 0.0
    lengths = []
    for task_id in (5, 6):
        # The documented seeding: a trajectory's task/init/length and its data.
        generator = slot_generator(4, task_id, 2, "trajectory")
        task = image_family.sample_task(generator)
        params = image_family.init_params(task, generator)
        length = estimator._sample_length(generator)
        lengths.append(length)
        batches = image_family.sample_batches(task, slot_generator(4, task_id, 2, "data"), length)
        leaves = {key: value.clone().requires_grad_() for key, value in theta.items()}
        loss = manual_trajectory_loss(image_family, small_rule, leaves, task, params, batches, length)
        expected_grad = expected_grad + flat(dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())))))
        expected_loss += float(loss)
    assert len(set(lengths)) == 2  # different lengths in one batch: padding is masked out
    torch.testing.assert_close(flat(result.grad_sum), expected_grad, rtol=1e-9, atol=1e-12)
    assert float(result.meta_loss_sum) == pytest.approx(expected_loss, rel=1e-12)


def test_truncated_bptt_equals_autograd_on_one_truncation(image_family, small_rule) -> None:
    estimator = build_estimator("truncated_bptt", image_family, small_rule, truncation_length=3, min_unroll=50,
                                max_unroll=50, stagger=False, seed=2, compile=False)
    theta = theta_for(small_rule)
    state = estimator.init_state(theta, [0, 1], 0)
    state = estimator.estimate(theta, state, [0, 1], 0).new_state  # start mid-trajectory
    assert state["step"].tolist() == [3, 3]
    result = estimator.estimate(theta, state, [0, 1], 1)
    expected = 0.0
    for slot, task_id in enumerate((0, 1)):
        task = {key[5:]: value[slot] for key, value in state.items() if key.startswith("task/")}
        params = {key[7:]: value[slot, 0] for key, value in state.items() if key.startswith("params/")}
        opt_state = {name: {"momentum": state[f"opt_state/{name}/momentum"][slot, 0]} for name in params}
        batches = image_family.sample_batches(task, slot_generator(2, task_id, 1, "data", 0), 3)
        leaves = {key: value.clone().requires_grad_() for key, value in theta.items()}
        loss = manual_trajectory_loss(image_family, small_rule, leaves, task, params, batches, 3, opt_state,
                                      first_step=3)
        expected = expected + flat(dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())))))
    torch.testing.assert_close(flat(result.grad_sum), expected, rtol=1e-9, atol=1e-12)
    assert result.new_state["step"].tolist() == [6, 6]


# -------------------------------------------------------------------------- unbiasedness
# A deterministic inner problem (fixed task, init and data): the full-trajectory meta-loss F
# is a deterministic function of theta whose exact gradient full BPTT gives. Trajectories of
# 6 steps; truncations of 4 straddle resets (the PES gradient split), truncations of 3 do not.
UNROLL = 6
GROUPS, PER_GROUP = 48, 16


@pytest.fixture(scope="module")
def deterministic_problem(small_rule):
    family = LinearRegressionTaskFamily(num_features=2, batch_size=4, deterministic=True, dtype=torch.float64)
    theta = theta_for(small_rule)
    options = dict(min_unroll=UNROLL, max_unroll=UNROLL, std=1e-3, compile=False)
    truth = flat(build_estimator("full_bptt", family, small_rule, **options).estimate(theta, {}, [0], 0).grad_sum)
    assert truth.abs().max() > 1e-3
    return family, theta, options, truth


def group_means(family, rule, theta, options, name: str, truncation: int) -> torch.Tensor:
    """Independent samples: mean estimate of each task group over a whole number of cycles.

    In the steady state (after every slot's first, staggered trajectory) positions in the
    trajectory repeat with period lcm(T, 6); averaging each slot over that many steps weights
    every position equally, so the mean truncated estimate is an estimate of grad F.
    """
    window = math.lcm(truncation, UNROLL) // truncation
    warmup = math.ceil(UNROLL / truncation)
    estimator = build_estimator(name, family, rule, truncation_length=truncation, **options)
    means = []
    for group in range(GROUPS):
        task_ids = list(range(group * PER_GROUP, (group + 1) * PER_GROUP))
        state = estimator.init_state(theta, task_ids, 0)
        total = 0.0
        for outer_step in range(warmup + window):
            result = estimator.estimate(theta, state, task_ids, outer_step)
            state = result.new_state
            if outer_step >= warmup:
                total = total + flat(result.grad_sum) / (PER_GROUP * window)
        means.append(total)
    return torch.stack(means)


def z_scores(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    mean = samples.mean(0)
    standard_error = samples.std(0) / math.sqrt(samples.shape[0])
    return (mean - truth).abs() / (standard_error + 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("truncation", [3, 4])
def test_pes_is_unbiased_for_the_full_trajectory_gradient(deterministic_problem, small_rule, truncation: int) -> None:
    family, theta, options, truth = deterministic_problem
    samples = group_means(family, small_rule, theta, options, "pes", truncation)
    assert z_scores(samples, truth).max() < 4.0
    # The test has power: truncated ES (PES without accumulators) is biased and fails it.
    biased = group_means(family, small_rule, theta, options, "truncated_es", truncation)
    assert z_scores(biased, truth).max() > 8.0


def test_full_es_is_unbiased(deterministic_problem, small_rule) -> None:
    family, theta, options, truth = deterministic_problem
    estimator = build_estimator("es", family, small_rule, num_antithetic=2, **options)
    samples = torch.stack([
        flat(estimator.estimate(theta, {}, list(range(g * PER_GROUP, (g + 1) * PER_GROUP)), 0).grad_sum) / PER_GROUP
        for g in range(GROUPS)])
    assert z_scores(samples, truth).max() < 4.0
    assert z_scores(samples, 1.5 * truth).max() > 8.0  # and it would notice a wrong scale


# ----------------------------------------------------------------------- state contracts
@pytest.mark.parametrize("name", ALL)
def test_split_over_processes_gives_the_same_sums(image_family, small_rule, name: str) -> None:
    options = dict(truncation_length=3, min_unroll=2, max_unroll=6, num_antithetic=2, std=0.05, seed=7,
                   compile=False)
    estimator = build_estimator(name, image_family, small_rule, **options)
    theta = theta_for(small_rule)
    everything = list(range(4))
    whole = estimator.init_state(theta, everything, 0)
    parts = [estimator.init_state(theta, ids, 0) for ids in ([0, 1], [2, 3])]
    for key, value in whole.items():  # the state is a per-slot concatenation
        torch.testing.assert_close(torch.cat([part[key] for part in parts]), value, rtol=0, atol=0)
    for outer_step in range(2):
        result = estimator.estimate(theta, whole, everything, outer_step)
        pieces = [estimator.estimate(theta, part, ids, outer_step) for part, ids in zip(parts, ([0, 1], [2, 3]))]
        assert result.num_tasks == 4 and [piece.num_tasks for piece in pieces] == [2, 2]
        torch.testing.assert_close(flat(result.grad_sum), flat(pieces[0].grad_sum) + flat(pieces[1].grad_sum),
                                   rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result.meta_loss_sum, pieces[0].meta_loss_sum + pieces[1].meta_loss_sum)
        for key, value in result.new_state.items():
            torch.testing.assert_close(torch.cat([piece.new_state[key] for piece in pieces]), value,
                                       rtol=1e-9, atol=1e-12)
        whole, parts = result.new_state, [piece.new_state for piece in pieces]
    assert any(float(value.abs().max()) > 0 for value in result.grad_sum.values())
    assert math.isfinite(result.stats["meta_loss"]) and result.stats["inner_steps"] > 0


@pytest.mark.parametrize("name", TRUNCATED)
def test_state_is_checkpointable_and_resumes_identically(image_family, small_rule, name: str) -> None:
    options = dict(truncation_length=2, min_unroll=2, max_unroll=5, num_antithetic=1, std=0.05, compile=False)
    estimator = build_estimator(name, image_family, small_rule, **options)
    theta = theta_for(small_rule)
    state = estimator.init_state(theta, [3, 4, 5], 10)
    state = estimator.estimate(theta, state, [3, 4, 5], 10).new_state
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    restored = load_safetensors(save_safetensors(state))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=True)
    results = [estimator.estimate(theta, candidate, [3, 4, 5], 11) for candidate in (state, restored, reloaded)]
    # A fresh estimator object (a restarted process) continues the same way.
    results.append(build_estimator(name, image_family, small_rule, **options).estimate(theta, restored, [3, 4, 5], 11))
    for other in results[1:]:
        # Equal up to summation order (loaded buffers may be aligned differently for SIMD).
        torch.testing.assert_close(flat(other.grad_sum), flat(results[0].grad_sum), rtol=1e-12, atol=1e-15)
        for key, value in results[0].new_state.items():
            torch.testing.assert_close(other.new_state[key], value, rtol=1e-12, atol=1e-15)


def test_pes_state_layout_resets_and_staggering(image_family, small_rule) -> None:
    estimator = build_estimator("pes", image_family, small_rule, truncation_length=4, min_unroll=3, max_unroll=40,
                                num_antithetic=2, compile=False)
    theta = theta_for(small_rule)
    task_ids = list(range(12))
    state = estimator.init_state(theta, task_ids, 0)
    assert state["params/w0"].shape == (12, 4, 64, 8)  # slots x (2 x antithetic) copies
    assert state["pes_accumulator/w0"].shape == (12, 2, 3, 4)
    assert (state["pes_accumulator/w0"] == 0).all() and (state["step"] == 0).all()
    assert len(set(state["length"].tolist())) > 4 and (state["length"] >= 1).all()  # staggered
    resets = 0.0
    for outer_step in range(6):
        before = state
        result = estimator.estimate(theta, state, task_ids, outer_step)
        state = result.new_state
        resets += result.stats["resets"]
        finished = before["step"] + 4 > before["length"]  # a reset happened inside the truncation
        continued = ~finished
        assert torch.equal(state["step"][continued], before["step"][continued] + 4)
        assert (state["step"][finished] <= 4).all() and (state["length"] <= 40).all()
        assert (state["length"][finished] >= 3).all()
        # Accumulators grow by one perturbation per truncation and restart with the trajectory.
        noise = estimator._perturbations(theta, task_ids, outer_step)["w0"]
        torch.testing.assert_close(state["pes_accumulator/w0"][finished], noise[finished])
        torch.testing.assert_close(state["pes_accumulator/w0"][continued],
                                   before["pes_accumulator/w0"][continued] + noise[continued])
        # The + and - copies of a pair share the task but not (once perturbed) the parameters.
        assert not torch.equal(state["params/w0"][:, 0], state["params/w0"][:, 1])
        assert result.stats["resets"] == float(finished.sum())
    assert resets > 0


def test_unroll_lengths_are_log_uniform(image_family, small_rule) -> None:
    estimator = build_estimator("truncated_es", image_family, small_rule, min_unroll=10, max_unroll=1000,
                                stagger=False, compile=False)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([estimator._sample_length(generator) for _ in range(4000)], dtype=torch.float64)
    assert lengths.min() >= 10 and lengths.max() <= 1000
    # log-uniform: log L is uniform on [log 10, log 1001): median ~ 100, a third below ~ 46.
    assert 85 < lengths.median() < 118
    assert abs(float((lengths < 46.4).double().mean()) - 1 / 3) < 0.04


def test_estimates_are_deterministic(image_family, small_rule) -> None:
    estimator = build_estimator("pes", image_family, small_rule, truncation_length=2, min_unroll=2, max_unroll=4,
                                compile=False)
    theta = theta_for(small_rule)
    first = estimator.estimate(theta, estimator.init_state(theta, [0, 1], 0), [0, 1], 0)
    second = estimator.estimate(theta, estimator.init_state(theta, [0, 1], 0), [0, 1], 0)
    other_step = estimator.estimate(theta, estimator.init_state(theta, [0, 1], 0), [0, 1], 1)
    assert isinstance(first, EstimateResult)
    assert torch.equal(flat(first.grad_sum), flat(second.grad_sum))
    assert not torch.equal(flat(first.grad_sum), flat(other_step.grad_sum))


def test_pes_final_fraction_counts_only_the_end_of_each_trajectory(image_family) -> None:
    """``final_fraction``: the plan knows each step's place in its trajectory; PES's meta-gradient then uses only
    the loss differences of steps in the last fraction — none in a truncation that lies before it."""
    options = dict(truncation_length=4, min_unroll=20, max_unroll=20, num_antithetic=1, compile=False, stagger=False)
    small_rule = build_rule("per_param_mlp", hidden_sizes=(4,), step_mult=0.01)  # trains 20 steps without blowing up
    theta = theta_for(small_rule)
    task_ids = [0, 1]
    whole = build_estimator("pes", image_family, small_rule, **options)
    end = build_estimator("pes", image_family, small_rule, final_fraction=0.25, **options)
    state = whole.init_state(theta, task_ids, 0)
    for outer_step in range(5):  # trajectories of 20 steps: truncations at steps 0-3, 4-7, ..., 16-19
        plan = whole._plan(state, task_ids, outer_step)
        torch.testing.assert_close(plan.progress, (4 * outer_step + torch.arange(4.0)).unsqueeze(1).expand(4, 2) / 20)
        full = whole.estimate(theta, state, task_ids, outer_step)
        last = end.estimate(theta, state, task_ids, outer_step)
        assert torch.equal(full.meta_loss_sum, last.meta_loss_sum)  # the reported meta-loss is the plain mean
        for key in theta:
            assert torch.equal(full.new_state[f"pes_accumulator/{key}"], last.new_state[f"pes_accumulator/{key}"])
        if outer_step < 3:  # steps 0-11: before the last quarter (15-19), so no signal at all
            assert all(not value.any() for value in last.grad_sum.values()) and flat(full.grad_sum).abs().sum() > 0
        elif outer_step == 4:  # steps 16-19 are all in the last quarter: the same as counting every step
            for key in theta:
                assert torch.equal(last.grad_sum[key], full.grad_sum[key])
        state = full.new_state
    with pytest.raises(ValueError, match="final_fraction: must be in"):
        build_estimator("pes", image_family, small_rule, final_fraction=0.0)
