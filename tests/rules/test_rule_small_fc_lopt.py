"""small_fc_lopt reproduces learned_optimization's AdafacMLPLOpt (reference vectors), every step and shape."""

import pytest
import torch

from lopt_hf.rules import build_rule
from lopt_hf.rules.features import factored_dims
from lopt_hf.rules.small_fc_lopt import HAIKU_NAMES
from support import NUM_STEPS, PARAM_NAMES, load_refvectors as load, subtree

# Our state name → the JAX state path (decay axis last there, first here).
STATE_PATHS = {
    "momentum": "mom_rolling/m",
    "rms": "rms_rolling/rms",
    "v_row": "fac_rolling_features/v_row",
    "v_col": "fac_rolling_features/v_col",
    "v_diag": "fac_rolling_features/v_diag",
}


def assert_state_matches(state: dict[str, torch.Tensor], arrays, prefix: str, name: str, where) -> None:
    for key, path in STATE_PATHS.items():
        expected = arrays[f"{prefix}/{path}/{name}"]
        if key not in state:  # an unused factored slot: (0, n_decays) in the JAX state
            assert expected.numel() == 0, (where, key)
            continue
        actual = state[key].movedim(0, -1)
        assert actual.shape == expected.shape, (where, key)
        tolerance = 1e-5 * expected.abs().max().item() + 1e-12
        assert (actual - expected).abs().max().item() <= tolerance, (where, key)


@pytest.mark.parametrize("variant", ["theta0", "theta0_perturbed"])
def test_matches_reference_vectors(variant: str) -> None:
    arrays = load(f"small_fc_lopt_{variant}")
    rule = build_rule("small_fc_lopt")
    theta = {HAIKU_NAMES[key]: value for key, value in subtree(arrays, "theta").items()}
    assert {k: tuple(v.shape) for k, v in theta.items()} == rule.theta_shapes()
    if variant == "theta0_perturbed":
        assert theta["momentum_decays"].abs().max() > 0  # the learned decays are exercised
    states = {name: rule.init_state(arrays[f"init_params/{name}"]) for name in PARAM_NAMES}
    for name in PARAM_NAMES:
        assert_state_matches(states[name], arrays, "init_state", name, ("init", name))
    for step in range(NUM_STEPS):
        for name in PARAM_NAMES:
            param = arrays[f"step{step}/params/{name}"]
            grad = arrays[f"step{step}/grads/{name}"]
            delta, states[name] = rule.update(theta, param, grad, states[name], step)
            # params_out is float32, so the implied step carries ~1 ulp of the parameter (≈1e-8).
            expected = param - arrays[f"step{step}/params_out/{name}"]
            scale = expected.abs().max().item()
            assert delta.shape == expected.shape
            assert (delta - expected).abs().max().item() <= 1e-5 * scale + 1e-7, (step, name)
            assert_state_matches(states[name], arrays, f"step{step}/state", name, (step, name))


def test_haiku_names_cover_theta() -> None:
    rule = build_rule("small_fc_lopt")
    assert sorted(HAIKU_NAMES.values()) == sorted(rule.theta_shapes())
    assert rule.theta_shapes()["w0"] == (39, 32)


def test_factored_dims_follow_numpy_argsort() -> None:
    assert factored_dims((16, 32)) == (0, 1)
    assert factored_dims((32, 10)) == (1, 0)
    assert factored_dims((3, 3, 4, 8)) == (2, 3)
    assert factored_dims((5, 5)) == (0, 1)  # ties: the later dim counts as the largest
    assert factored_dims((7,)) is None and factored_dims(()) is None


@pytest.mark.parametrize("shape, chunk_size", [((301, 257), 4096), ((3, 3, 40, 52), 1000), ((70001,), 8192),
                                               ((5, 9000), 4096)])
def test_chunked_equals_whole(shape, chunk_size) -> None:
    rule = build_rule("small_fc_lopt")
    gen = torch.Generator().manual_seed(0)
    theta = rule.init_theta(gen)
    theta = {key: value + 0.1 * torch.randn(value.shape, generator=gen) for key, value in theta.items()}
    param, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    state = rule.init_state(param)
    _, state = rule.update(theta, param, torch.randn(shape, generator=gen), state, 0)
    whole, whole_state = rule.update(theta, param, grad, state, 7)
    with torch.no_grad():  # deployment: also switches to the in-place / norm kernels
        chunked, chunked_state = rule.update(theta, param, grad, state, 7, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
    torch.testing.assert_close(chunked_state, whole_state, rtol=0, atol=0)
