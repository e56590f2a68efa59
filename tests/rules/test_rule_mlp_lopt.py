"""mlp_lopt reproduces learned_optimization's MLPLOpt (reference vectors), every step and shape."""

import pytest
import torch

from lopt_hf.rules import build_rule
from lopt_hf.rules.mlp_lopt import HAIKU_NAMES
from support import NUM_STEPS, PARAM_NAMES, load_refvectors as load, subtree


def assert_step_matches(delta: torch.Tensor, param: torch.Tensor, param_out: torch.Tensor, where) -> None:
    # params_out is float32, so the implied step carries ~1 ulp of the parameter (≈1e-8).
    expected = param - param_out
    scale = expected.abs().max().item()
    assert delta.shape == expected.shape, where
    assert (delta - expected).abs().max().item() <= 1e-5 * scale + 1e-7, where


@pytest.mark.parametrize("variant", ["theta0", "theta0_perturbed"])
def test_matches_reference_vectors(variant: str) -> None:
    arrays = load(f"mlp_lopt_{variant}")
    rule = build_rule("mlp_lopt")
    theta = {HAIKU_NAMES[key]: value for key, value in subtree(arrays, "theta").items()}
    assert {k: tuple(v.shape) for k, v in theta.items()} == rule.theta_shapes()
    states = {name: rule.init_state(arrays[f"init_params/{name}"]) for name in PARAM_NAMES}
    for name in PARAM_NAMES:
        torch.testing.assert_close(states[name]["momentum"].movedim(0, -1),
                                   arrays[f"init_state/rolling_features/m/{name}"])
    for step in range(NUM_STEPS):
        for name in PARAM_NAMES:
            param = arrays[f"step{step}/params/{name}"]
            grad = arrays[f"step{step}/grads/{name}"]
            delta, states[name] = rule.update(theta, param, grad, states[name], step)
            assert_step_matches(delta, param, arrays[f"step{step}/params_out/{name}"], (step, name))
            # State keeps the decay axis first; the JAX state has it last.
            torch.testing.assert_close(states[name]["momentum"].movedim(0, -1),
                                       arrays[f"step{step}/state/rolling_features/m/{name}"], rtol=1e-6, atol=1e-8)


def test_haiku_names_cover_theta() -> None:
    rule = build_rule("mlp_lopt")
    assert sorted(HAIKU_NAMES.values()) == sorted(rule.theta_shapes())


@pytest.mark.parametrize("shape, chunk_size", [((301, 257), 4096), ((3, 3, 40, 52), 1000), ((70001,), 8192)])
def test_chunked_equals_whole(shape, chunk_size) -> None:
    rule = build_rule("mlp_lopt")
    gen = torch.Generator().manual_seed(0)
    theta = rule.init_theta(gen)
    theta = {key: value + 0.1 * torch.randn(value.shape, generator=gen) for key, value in theta.items()}
    param, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    state = {"momentum": torch.randn((6, *shape), generator=gen)}
    whole, whole_state = rule.update(theta, param, grad, state, 7)
    with torch.no_grad():  # deployment: also switches to the in-place / norm kernels
        chunked, chunked_state = rule.update(theta, param, grad, state, 7, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
    torch.testing.assert_close(chunked_state, whole_state, rtol=0, atol=0)
