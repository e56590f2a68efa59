"""``velo`` reproduces the original JAX VeLO (``HyperV2``) at both sizes of the reference vectors.

Reference vectors: ``tests/fixtures/refvectors/velo_{s,4000}_random_perturbed`` (see
``SOURCE_README.md`` there): random theta with non-zero biases, six steps over a tree of 1-D, 2-D,
4-D and (1,) tensors, one gradient spike beyond the ±1000 clip and one loss far above the running
mean. Every step, every tensor: the step, the accumulators, the LSTM rows and the loss buffer.
"""

from __future__ import annotations

import pytest
import torch

from lopt_hf.rules import build_rule
from support import PARAM_NAMES, assert_scheduled_state_matches, load_refvectors, scheduled_refvector_steps

# The reference's constructor arguments (its JSON ``rule``); velo_4000 is the rule's default.
SIZES = {"velo_s_random_perturbed": {"lstm_hidden_size": 64, "param_inits": 32, "ff_mult": 1.0},
         "velo_4000_random_perturbed": {}}


def assert_step_matches(step: torch.Tensor, params: torch.Tensor, params_out: torch.Tensor, msg: str) -> None:
    """``step`` equals the original's ``params − params_out`` up to the rounding of ``params_out``.

    VeLO's steps are tiny (velo_s: ~1e-8, a few float32 ulps of the parameters), so a fixed
    absolute tolerance would pass a zero step. The original's step is only known to within one
    ulp of ``params_out`` (the subtraction rounded it); beyond that a relative 1e-4 (jit-vs-eager
    noise of the original, plus our own rounding; observed up to 7e-5 on velo_4000).
    """
    implied = params.double() - params_out.double()
    ulp = (torch.nextafter(params_out.abs(), torch.tensor(float("inf"))) - params_out.abs()).double()
    excess = (step.double() - implied).abs() - (ulp + 1e-4 * implied.abs())
    assert excess.max() <= 0, f"{msg}: worst excess {excess.max().item():.3e} (step max {implied.abs().max():.3e})"


@pytest.mark.parametrize("stem", sorted(SIZES))
def test_reproduces_reference_vectors(stem: str) -> None:
    rule = build_rule("velo", **SIZES[stem])
    for k, arrays, steps, states, schedule_state in scheduled_refvector_steps(rule, stem):
        for index, name in enumerate(PARAM_NAMES):
            assert_step_matches(steps[name], arrays[f"step{k}/params/{name}"], arrays[f"step{k}/params_out/{name}"],
                                f"step {k} {name}")
        assert_scheduled_state_matches(arrays, k, states, schedule_state, keeps_every_accumulator=True)


@pytest.mark.parametrize("stem", sorted(SIZES))
def test_theta_names_and_shapes_are_the_originals(stem: str) -> None:
    arrays = load_refvectors(stem)
    original = {key[len("theta/"):]: tuple(value.shape) for key, value in arrays.items() if key.startswith("theta/")}
    assert build_rule("velo", **SIZES[stem]).theta_shapes() == original


def test_tensor_summary_reads_the_state_before_the_step() -> None:
    """The scheduler sees the accumulators before this step's update, normalised by rms(p): scaling
    p and the state together changes nothing, the gradient is not read, and the rank slot moves."""
    rule = build_rule("velo", **SIZES["velo_s_random_perturbed"])
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(4, 6, generator=gen)
    state = {key: torch.rand(value.shape, generator=gen) for key, value in rule.init_state(param).items()}
    summary = rule.tensor_summary(param, torch.randn(4, 6, generator=gen), state)
    assert summary.shape == (rule.summary_size(),) == (12,)
    torch.testing.assert_close(rule.tensor_summary(param, torch.zeros(4, 6), state), summary, rtol=0, atol=0)
    scaled = {key: value * 3.0 for key, value in state.items()}
    torch.testing.assert_close(rule.tensor_summary(param * 3.0, torch.zeros(4, 6), scaled), summary)
    assert summary[1:6].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]  # rank 2 (mean_rms comes first)
    column = rule.tensor_summary(param[:, :1], torch.zeros(4, 1), rule.init_state(param[:, :1]))
    assert column[1:6].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]  # (4, 1) has one dim > 1
