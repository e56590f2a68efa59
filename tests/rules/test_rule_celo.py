"""``celo`` / ``celo_adam`` reproduce the original JAX code with the authors' published weights.

Reference vectors: ``tests/fixtures/refvectors/celo{,_adam}_{published,random_perturbed}`` (see
``SOURCE_README.md`` there; the published checkpoints are MIT, ``LICENSE-celo-checkpoints.txt``).
Six steps over a tree of 1-D, 2-D, 4-D and (1,) tensors, one of them a gradient spike beyond the
±1000 clip and one loss far above the running mean (the loss clip).
"""

from __future__ import annotations

import pytest
import torch

from lopt_hf.rules import build_rule
from support import PARAM_NAMES, assert_scheduled_state_matches, load_refvectors, scheduled_refvector_steps, subtree

CASES = [("celo_published", "celo"), ("celo_random_perturbed", "celo"),
         ("celo_adam_published", "celo_adam"), ("celo_adam_random_perturbed", "celo_adam")]


@pytest.mark.parametrize("stem, rule_name", CASES)
def test_reproduces_reference_vectors(stem: str, rule_name: str) -> None:
    rule = build_rule(rule_name)
    for k, arrays, steps, states, schedule_state in scheduled_refvector_steps(rule, stem):
        for index, name in enumerate(PARAM_NAMES):
            implied = arrays[f"step{k}/params/{name}"] - arrays[f"step{k}/params_out/{name}"]
            # the implied step is ~1e-3·direction: jit-vs-eager noise of the original is 1.5e-8 absolute
            torch.testing.assert_close(steps[name], implied, rtol=1e-4, atol=1e-7, msg=f"step {k} {name}")
        assert_scheduled_state_matches(arrays, k, states, schedule_state, keeps_every_accumulator=rule_name == "celo")


def test_loss_clip_is_exercised() -> None:
    """At the loss spike (40 after losses near 2) the reference means are far from an unclipped EMA,
    so matching them above proves the clip."""
    rule = build_rule("celo")
    previous = None
    spikes = 0
    for k, arrays, _, _, schedule_state in scheduled_refvector_steps(rule, "celo_published"):
        loss = float(arrays[f"step{k}/loss"])
        if previous is not None and loss > 10:
            decays = previous["loss_decays"]
            unclipped = previous["loss_means"] * decays + loss * (1.0 - decays)
            expected = arrays[f"step{k}/state/loss_buffer/means"]
            assert (unclipped - expected).abs().min() > 0.5
            spikes += 1
        previous = schedule_state
    assert spikes == 1


def test_published_celo_theta_names_are_the_originals() -> None:
    rule = build_rule("celo")
    names = set(rule.theta_shapes())
    assert "ff_mod_stack/~/w0__13" in names and "rnn_params/rnn/linear/w" in names
    assert rule.theta_shapes()["rnn_params/rnn/linear/w"] == (128, 256)


# ------------------------------------------------------------------ celo_adam with per-tensor scheduler inputs
def test_tensor_features_warm_started_from_published_reproduces_it() -> None:
    """``tensor_features=True`` with the published theta widened by zero weights is published Celo-Adam."""
    rule = build_rule("celo_adam", tensor_features=True)
    assert rule.summary_size() == 8
    published = subtree(load_refvectors("celo_adam_published"), "theta")
    widened = rule.with_summary_inputs(published)
    for key, value in widened.items():
        if value.shape != published[key].shape:  # the mix layers' new input rows, and only those
            assert key.startswith("rnn_params/linear") and value.shape[0] == published[key].shape[0] + 8
            assert torch.equal(value[:-8], published[key]) and not value[-8:].any()
    for k, arrays, steps, _, _ in scheduled_refvector_steps(rule, "celo_adam_published", theta=widened):
        for name in PARAM_NAMES:
            implied = arrays[f"step{k}/params/{name}"] - arrays[f"step{k}/params_out/{name}"]
            torch.testing.assert_close(steps[name], implied, rtol=1e-4, atol=1e-7, msg=f"step {k} {name}")


def test_tensor_features_let_the_step_size_differ_between_tensors() -> None:
    """The same Adam moments, one published theta: without summaries every tensor gets one ``lr_mult``;
    with weights on the summaries, tensors of different kinds (a bias, a matrix, a kernel) get their own."""
    rule = build_rule("celo_adam", tensor_features=True)
    widened = rule.with_summary_inputs(subtree(load_refvectors("celo_adam_published"), "theta"))
    theta = {key: value.clone() for key, value in widened.items()}
    generator = torch.Generator().manual_seed(0)
    for key in ("rnn_params/linear_1/w", "rnn_params/linear_2/w"):
        theta[key][-8:] = torch.randn(8, theta[key].shape[1], generator=generator)
    for k, _, _, states, schedule_state in scheduled_refvector_steps(rule, "celo_adam_published", theta=widened):
        pass
    params = subtree(load_refvectors("celo_adam_published"), "init_params")
    summaries = torch.stack([rule.tensor_summary(params[n], params[n], states[n]) for n in PARAM_NAMES])
    assert summaries.shape == (len(PARAM_NAMES), 8) and torch.isfinite(summaries).all()
    rows = {key: torch.stack([states[n][key] for n in PARAM_NAMES]) for key in rule.schedule_tensor_keys}
    steps = torch.full((len(PARAM_NAMES),), 6)
    lr_mults = {name: rule.schedule(weights, schedule_state, rows, summaries, steps, torch.tensor(2.0))[0][:, 0]
                for name, weights in (("zero", widened), ("learned", theta))}
    zero, learned = lr_mults["zero"], lr_mults["learned"]
    torch.testing.assert_close(zero, zero[:1].expand_as(zero), rtol=1e-6, atol=0.0)  # one value (to rounding)
    assert (learned.max() - learned.min()) / learned.mean() > 0.01


def test_widening_refuses_a_theta_of_another_shape() -> None:
    rule = build_rule("celo_adam", tensor_features=True)
    theta = build_rule("celo_adam").init_theta(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="linear_2/w.*without the 8 per-tensor summary inputs"):
        rule.with_summary_inputs({**theta, "rnn_params/linear_2/w": theta["rnn_params/linear_2/w"][:-1]})
    del theta["rnn_params/step_size/b"]
    with pytest.raises(ValueError, match="step_size/b"):
        rule.with_summary_inputs(theta)


# ------------------------------------------------------------------ fixed schedules, Newton–Schulz for matrices
def test_warmup_cosine_warms_up_linearly_then_decays_to_zero() -> None:
    from lopt_hf.rules.scheduler import warmup_cosine

    total = torch.tensor(100.0)
    values = torch.stack([warmup_cosine(torch.tensor(float(step)), total) for step in range(101)])
    torch.testing.assert_close(values[:5], torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0]))  # 5% of 100 steps
    assert (values[5:].diff() <= 0).all() and 0 < values[99] < 1e-3 and values[100] == 0.0
    assert float(values[52]) == pytest.approx(0.5, abs=0.02)  # half way through the decay
    assert float(warmup_cosine(torch.tensor(0.0), torch.tensor(3.0))) == 1.0  # a short run: one warmup step


@pytest.mark.parametrize("schedule", ["constant", "warmup_cosine"])
def test_a_fixed_lr_schedule_replaces_the_learned_lr_mult(schedule: str) -> None:
    """Same theta, same inputs: the learned rule's lr_mult is Celo's read-out; a fixed schedule's is its own value,
    the same for every tensor, at every step (here step 2 of 40 and step 30)."""
    from lopt_hf.rules.scheduler import warmup_cosine

    learned, fixed = build_rule("celo", lstm_hidden_size=8), build_rule("celo", lstm_hidden_size=8,
                                                                        lr_schedule=schedule)
    theta = learned.init_theta(torch.Generator().manual_seed(0))
    rows = {key: torch.zeros(3, 8) for key in learned.schedule_tensor_keys}
    for iteration in (2.0, 30.0):
        state = {**learned.init_schedule_state(40), "iteration": torch.tensor(iteration)}
        args = (theta, state, rows, torch.zeros(3, 0), torch.full((3,), 2), torch.tensor(1.5))
        theirs, ours = learned.schedule(*args)[0], fixed.schedule(*args)[0]
        expected = 1.0 if schedule == "constant" else float(warmup_cosine(torch.tensor(iteration), torch.tensor(40.0)))
        torch.testing.assert_close(ours[:, 0], torch.full((3,), expected))
        assert not torch.allclose(theirs[:, 0], ours[:, 0])
        torch.testing.assert_close(ours[:, 1:], theirs[:, 1:])  # the mixing controls are still the LSTM's
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        build_rule("celo_adam", lr_schedule="cosine")


def test_orthogonalize_turns_matrix_steps_orthogonal_at_adams_size() -> None:
    """Newton–Schulz for matrices and kernels: the step's singular values (of ``(shape[0], rest)``) are all near
    one value, its RMS is Adam's; vectors keep Adam's step exactly."""
    adam, ortho = build_rule("celo_adam", lstm_hidden_size=8), build_rule("celo_adam", lstm_hidden_size=8,
                                                                          orthogonalize=True)
    generator = torch.Generator().manual_seed(0)
    control = torch.tensor([1.0])
    for shape in ((24, 16), (16, 2, 3, 3), (16,)):
        param = torch.randn(shape, generator=generator)
        grad = torch.randn(shape, generator=generator) * torch.linspace(0.1, 3.0, shape[-1])
        steps = [rule.update(None, param, grad, rule.init_state(param), 0, control=control)[0] for rule in (adam, ortho)]
        if len(shape) == 1:
            torch.testing.assert_close(steps[1], steps[0], rtol=0, atol=0)
            continue
        rms = [float(step.square().mean().sqrt()) for step in steps]
        assert rms[1] == pytest.approx(rms[0], rel=1e-4)
        singular = torch.linalg.svdvals(steps[1].reshape(shape[0], -1))
        assert float(singular.max() / singular.min()) < 1.8  # the quintic iteration keeps them in ~[0.7, 1.2]
        adam_singular = torch.linalg.svdvals(steps[0].reshape(shape[0], -1))
        assert float(adam_singular.max() / adam_singular.min()) > 3.0  # Adam's own step is far from orthogonal


@pytest.mark.parametrize("config", [{}, {"orthogonalize": True}, {"param_scale_mult": True}])
@pytest.mark.parametrize("shape", [(), (5,), (6, 4), (2, 3, 4), (70, 9)])
def test_celo_adam_update_stacked_is_update_bit_for_bit(shape: tuple[int, ...], config: dict) -> None:
    """Each tensor of a stack gets exactly its own ``update`` (its own lr_mult, step and moments):
    what lets the optimizer stack same-shape tensors without changing a bit."""
    rule = build_rule("celo_adam", **config)
    gen = torch.Generator().manual_seed(3)
    theta = rule.init_theta(gen)
    params, grads = torch.randn(3, *shape, generator=gen), torch.randn(3, *shape, generator=gen) * 1e-2
    grads[1] *= 1e6  # beyond the clip for one tensor
    states = [{key: torch.rand(value.shape, generator=gen) * 1e-3 if key in ("momentum", "rms") else value
               for key, value in rule.init_state(params[i]).items()} for i in range(3)]
    control = torch.tensor([[0.5], [1.0], [3.0]])
    stacked, stacked_states = rule.update_stacked(
        theta, params, grads, {key: torch.stack([state[key] for state in states]) for key in states[0]}, 4,
        control=control)
    for i in range(3):
        update, new_state = rule.update(theta, params[i], grads[i], states[i], 4, control=control[i])
        assert torch.equal(stacked[i], update)
        assert all(torch.equal(stacked_states[key][i], value) for key, value in new_state.items())
