"""celo2 reproduces Celo2's original JAX code (reference vectors), every step, 1-D/2-D/4-D tensors.

Theta comes from the real checkpoint format: each ``celo2_theta{0,1}.state`` (flax msgpack) is
converted with ``lopt-hf convert`` into an artifact folder and loaded back with
``load_artifact``, so these tests cover converter + artifact + rule end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lopt_hf.convert.celo2 import convert_celo2
from lopt_hf.hub import load_artifact
from lopt_hf.rules import build_rule
from lopt_hf.rules.celo2 import Celo2, newton_schulz
from support import FIXTURES, NUM_STEPS, PARAM_NAMES, STACK_SHAPES, load_refvectors as load

ORTH_PARAMS = ("dense1/kernel", "dense2/kernel")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(theta file, variant) -> converted artifact folder."""
    root = tmp_path_factory.mktemp("celo2_artifacts")
    folders = {}
    for theta_name in ("theta0", "theta1"):
        for variant in ("celo2", "celo2-base"):
            folder = root / f"{variant}_{theta_name}"
            convert_celo2(FIXTURES / f"celo2_{theta_name}.state", folder, variant=variant)
            folders[theta_name, variant] = folder
    return folders


def _jax_state(arrays: dict[str, torch.Tensor], prefix: str, name: str) -> dict[str, torch.Tensor]:
    """The original's state of tensor ``name`` in our naming (decay axis moved first)."""
    state = {"momentum": arrays[f"{prefix}/mom_rolling/m/{name}"], "rms": arrays[f"{prefix}/rms_rolling/rms/{name}"]}
    for ours, theirs in (("v_row", "v_row"), ("v_col", "v_col"), ("v_diag", "v_diag")):
        value = arrays[f"{prefix}/fac_rolling/{theirs}/{name}"]
        if value.numel():
            state[ours] = value
    return {key: value.movedim(-1, 0) for key, value in state.items()}


@pytest.mark.parametrize("theta_name", ["theta0", "theta1"])
@pytest.mark.parametrize("kind", ["base", "orth"])
def test_matches_reference_vectors(kind: str, theta_name: str, artifacts) -> None:
    arrays = load(f"celo2_{kind}_{theta_name}")
    artifact = load_artifact(artifacts[theta_name, "celo2" if kind == "orth" else "celo2-base"])
    rule, theta = artifact.rule, artifact.theta()
    assert rule.orthogonalize is (kind == "orth")
    names = ORTH_PARAMS if kind == "orth" else PARAM_NAMES
    states = {name: rule.init_state(arrays[f"init_params/{name}"]) for name in names}
    for name in names:  # init matches the original's (all zeros, same shapes)
        expected = _jax_state(arrays, "init_state", name)
        assert {k: tuple(v.shape) for k, v in states[name].items()} == {k: tuple(v.shape) for k, v in expected.items()}
    for step in range(NUM_STEPS):  # step 3 has gradients beyond the ±1000 clip
        for name in names:
            param, grad = arrays[f"step{step}/params/{name}"], arrays[f"step{step}/grads/{name}"]
            update, states[name] = rule.update(theta, param, grad, states[name], step)
            torch.testing.assert_close(update, arrays[f"step{step}/updates/{name}"], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, s=step, n=name: f"step {s}, {n}: {m}")
            for key, expected in _jax_state(arrays, f"step{step}/state", name).items():
                torch.testing.assert_close(states[name][key], expected, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, s=step, n=name, k=key: f"state {k}, step {s}, {n}: {m}")


@pytest.mark.parametrize("shape", [(37,), (1,), (), (13, 29), (3, 3, 4, 8), (5, 2, 7)])
@pytest.mark.parametrize("orthogonalize", [False, True])
def test_chunked_equals_whole(shape: tuple[int, ...], orthogonalize: bool) -> None:
    rule = Celo2(orthogonalize=orthogonalize)
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    param, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    whole, whole_state = rule.update(theta, param, grad, rule.init_state(param), 0)
    for chunk_size in (1, 5, 16, 10_000):
        chunked, chunked_state = rule.update(theta, param, grad, rule.init_state(param), 0, chunk_size=chunk_size)
        # Newton–Schulz amplifies float rounding (~4e-6 on unit-RMS steps): the reference tolerance.
        tolerance = {"rtol": 1e-4, "atol": 1e-5} if orthogonalize else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(chunked, whole, **tolerance)
        assert chunked_state.keys() == whole_state.keys()
    assert whole.shape == param.shape


def test_theta_layout_and_init() -> None:
    rule = build_rule("celo2")
    shapes = rule.theta_shapes()
    assert [f"w0__{i}" for i in range(14)] == list(shapes)[:14]
    assert sum(shapes[f"w0__{i}"][0] for i in range(14)) == 30
    assert shapes["w1"] == (8, 8) and shapes["w2"] == (8, 3) and shapes["b2"] == (3,)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 347
    first = rule.init_theta(torch.Generator().manual_seed(0))
    again = rule.init_theta(torch.Generator().manual_seed(0))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(not first[k].any() for k in ("b0", "b1", "b2"))
    w0 = torch.cat([first[f"w0__{i}"].reshape(-1) for i in range(14)])
    assert w0.abs().max() <= 2 / 30 ** 0.5  # truncated normal, std 1/sqrt(30 inputs)


def test_vectors_use_only_the_first_nine_groups() -> None:
    rule = build_rule("celo2")
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    changed = dict(theta)
    for i in range(9, 14):
        changed[f"w0__{i}"] = theta[f"w0__{i}"] + 1.0
    param, grad = torch.randn(20), torch.randn(20)
    same, _ = rule.update(theta, param, grad, rule.init_state(param), 0)
    other, _ = rule.update(changed, param, grad, rule.init_state(param), 0)
    assert torch.equal(same, other)
    matrix, matrix_grad = torch.randn(4, 5), torch.randn(4, 5)
    a, _ = rule.update(theta, matrix, matrix_grad, rule.init_state(matrix), 0)
    b, _ = rule.update(changed, matrix, matrix_grad, rule.init_state(matrix), 0)
    assert not torch.allclose(a, b)


def test_unit_rms_per_slab_and_single_element_is_sign() -> None:
    rule = build_rule("celo2")
    theta = rule.init_theta(torch.Generator().manual_seed(3))
    kernel, grad = torch.randn(3, 3, 4, 8), torch.randn(3, 3, 4, 8)
    update, _ = rule.update(theta, kernel, grad, rule.init_state(kernel), 0)
    slab_rms = update.square().mean(dim=(-2, -1)).sqrt()
    torch.testing.assert_close(slab_rms, torch.ones(3, 3), rtol=1e-5, atol=1e-6)
    single, _ = rule.update(theta, torch.tensor([0.3]), torch.tensor([2.0]), rule.init_state(torch.zeros(1)), 0)
    assert single.abs().item() == pytest.approx(1.0, abs=1e-6)


def test_newton_schulz_batches_over_leading_axes() -> None:
    x = torch.randn(2, 3, 6, 4)
    batched = newton_schulz(x, (3.4445, -4.7750, 2.0315), 5, 1e-8)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(batched[i, j], newton_schulz(x[i, j], (3.4445, -4.7750, 2.0315), 5, 1e-8))
    singular = torch.linalg.svdvals(batched[0, 0])
    assert singular.min() > 0.5 and singular.max() < 1.3  # the quintic's approximate orthogonality


def test_vmap_and_grad_wrt_theta() -> None:
    rule = build_rule("celo2", orthogonalize=True)
    theta = rule.init_theta(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(2)
    params, grads = torch.randn(4, 6, 5, generator=gen), torch.randn(4, 6, 5, generator=gen)
    state = rule.init_state(params[0])
    batched_state = {k: v.expand(4, *v.shape).clone() for k, v in state.items()}

    def one(p, g, s):
        return rule.update(theta, p, g, s, 2)

    vmapped, _ = torch.func.vmap(one)(params, grads, batched_state)
    looped = torch.stack([one(params[i], grads[i], state)[0] for i in range(4)])
    torch.testing.assert_close(vmapped, looped, rtol=1e-4, atol=1e-5)  # batched matmuls round differently

    weights = torch.randn(6, 5, generator=gen)

    def loss(th):
        return (rule.update(th, params[0], grads[0], state, 2)[0] * weights).sum()

    grad_theta = torch.func.grad(loss)(theta)
    assert all(torch.isfinite(v).all() for v in grad_theta.values())
    assert grad_theta["w0__0"].abs().sum() > 0 and grad_theta["b2"][0].abs() > 0

    # Directional derivative against a central difference, in float64 (the rule is dtype-generic).
    def loss64(th):
        state64 = {k: v.double() for k, v in state.items()}
        return (rule.update(th, params[0].double(), grads[0].double(), state64, 2)[0] * weights.double()).sum()

    theta64 = {k: v.double() for k, v in theta.items()}
    grad64 = torch.func.grad(loss64)(theta64)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in theta.items()}
    eps = 1e-6
    plus = loss64({k: theta64[k] + eps * direction[k] for k in theta})
    minus = loss64({k: theta64[k] - eps * direction[k] for k in theta})
    analytic = sum((grad64[k] * direction[k]).sum() for k in theta)
    assert float(analytic) == pytest.approx(float((plus - minus) / (2 * eps)), rel=1e-5)


@pytest.mark.parametrize("orthogonalize", [False, True])
@pytest.mark.parametrize("shape", STACK_SHAPES)
def test_stacked_update_is_each_tensors_update(shape: tuple[int, ...], orthogonalize: bool) -> None:
    """update_stacked on B same-shape tensors (states stacked on axis 0) == update on each one:
    every statistic stays per tensor (feature/output normalisation, factored moments, Newton–Schulz,
    the final RMS). The deployment kernel's stacks: tests/kernels/test_celo2_kernel.py."""
    rule = Celo2(orthogonalize=orthogonalize)
    gen = torch.Generator().manual_seed(11)
    theta = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in rule.init_theta(gen).items()}
    stack = 3
    params = torch.randn(stack, *shape, generator=gen)
    states = [rule.init_state(params[i]) for i in range(stack)]
    stacked_state = {key: torch.stack([state[key] for state in states]) for key in states[0]}
    # different scales per tensor (one clipped at ±1000): a statistic shared across the stack would show
    scales = torch.tensor([1e-2, 1.0, 1e3]).view(stack, *([1] * len(shape)))
    for step in range(3):
        grads = torch.randn(stack, *shape, generator=gen) * scales
        stacked, stacked_state = rule.update_stacked(theta, params, grads, stacked_state, step)
        singles = []
        for i in range(stack):
            update, states[i] = rule.update(theta, params[i], grads[i], states[i], step)
            singles.append(update)
        assert stacked.shape == params.shape
        tolerance = {"rtol": 1e-4, "atol": 1e-5} if orthogonalize else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(stacked, torch.stack(singles), **tolerance)
        for key in stacked_state:
            torch.testing.assert_close(stacked_state[key], torch.stack([state[key] for state in states]),
                                       rtol=1e-6, atol=0)
        params = params - 0.01 * stacked
