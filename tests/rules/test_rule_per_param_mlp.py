"""per_param_mlp reproduces the tutorial's JAX rule (reference vectors), every step and shape."""

import pytest
import torch

from lopt_hf.rules import build_rule
from support import NUM_STEPS, PARAM_NAMES, load_refvectors as load, subtree


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("variant", ["theta0", "theta0_perturbed"])
def test_matches_reference_vectors(activation: str, variant: str) -> None:
    arrays = load(f"minimal_lopt_{activation}_{variant}")
    rule = build_rule("per_param_mlp", activation=activation)
    theta = subtree(arrays, "theta")
    assert {k: tuple(v.shape) for k, v in theta.items()} == rule.theta_shapes()
    states = {name: rule.init_state(arrays[f"init_params/{name}"]) for name in PARAM_NAMES}
    for step in range(NUM_STEPS):
        for name in PARAM_NAMES:
            param = arrays[f"step{step}/params/{name}"]
            grad = arrays[f"step{step}/grads/{name}"]
            delta, states[name] = rule.update(theta, param, grad, states[name], step)
            expected_delta = param - arrays[f"step{step}/params_out/{name}"]
            scale = expected_delta.abs().max().item()
            assert (delta - expected_delta).abs().max().item() <= 1e-5 * scale + 1e-7, (step, name)
            torch.testing.assert_close(states[name]["momentum"], arrays[f"step{step}/state/m/{name}"],
                                       rtol=1e-6, atol=1e-8)


def test_chunked_equals_whole() -> None:
    rule = build_rule("per_param_mlp")
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    param, grad = torch.randn(1000), torch.randn(1000)
    whole, _ = rule.update(theta, param, grad, rule.init_state(param), 0)
    chunked, _ = rule.update(theta, param, grad, rule.init_state(param), 0, chunk_size=64)
    torch.testing.assert_close(whole, chunked)
