"""Meta-training task families: sampling, losses (their datasets: tests/data/test_data.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lopt_hf.data import load_image_dataset
from lopt_hf.evaluation.lm import DEFAULT_TEXT, make_char_data
from lopt_hf.metatrain.lm_tasks import CharLMTaskFamily, causal_attention
from lopt_hf.metatrain.tasks import (SCALE_PREFIX, CNNImageTaskFamily, LinearRegressionTaskFamily, MLPImageTaskFamily,
                                    build_task_family, scaled)
from lopt_hf.metatrain.unroll import stack_dicts


# ----------------------------------------------------------------------------- MLP family
@pytest.fixture(scope="module")
def family() -> MLPImageTaskFamily:
    return MLPImageTaskFamily(hidden_sizes=(16, 8), batch_size=12, param_scale_range=(0.1, 10.0),
                              dtype=torch.float64)


def test_mlp_family_shapes_and_determinism(family: MLPImageTaskFamily) -> None:
    assert family.param_shapes == {"w0": (64, 16), "b0": (16,), "w1": (16, 8), "b1": (8,), "w2": (8, 10),
                                   "b2": (10,)}
    assert family.loss_scale == pytest.approx(math.log(10)) and family.loss_cap == pytest.approx(1.5 * math.log(10))

    def draw(seed: int):
        generator = torch.Generator().manual_seed(seed)
        task = family.sample_task(generator)
        return task, family.init_params(task, generator), family.sample_batches(task, generator, 3)

    first, again, other = draw(1), draw(1), draw(2)
    for a, b in zip(first, again):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(first[1]["w0"], other[1]["w0"])
    task, params, batch = first
    assert {key: tuple(value.shape) for key, value in params.items()} == family.param_shapes
    assert batch["inputs"].shape == (3, 12, 64) and batch["labels"].shape == (3, 12)
    assert batch["labels"].max() < 10
    scales = torch.stack([task[SCALE_PREFIX + key] for key in family.param_shapes])
    assert (scales >= 0.1).all() and (scales <= 10.0).all() and len(set(scales.tolist())) == len(scales)


def test_reparameterisation_leaves_the_function_unchanged(family: MLPImageTaskFamily) -> None:
    # Same init generator, different scales: stored params differ by 1/s, the loss does not.
    generator = torch.Generator().manual_seed(3)
    task = family.sample_task(generator)
    batch = {key: value[0] for key, value in family.sample_batches(task, generator, 1).items()}
    unit_task = {key: torch.ones_like(value) if key.startswith(SCALE_PREFIX) else value
                 for key, value in task.items()}
    scaled = family.init_params(task, torch.Generator().manual_seed(9))
    plain = family.init_params(unit_task, torch.Generator().manual_seed(9))
    torch.testing.assert_close(scaled["w0"] * task[SCALE_PREFIX + "w0"], plain["w0"])
    torch.testing.assert_close(family.loss(scaled, task, batch), family.loss(plain, unit_task, batch))
    # ... but the gradient w.r.t. the stored parameter is s times the plain one.
    grad_scaled = torch.func.grad(family.loss)(scaled, task, batch)
    grad_plain = torch.func.grad(family.loss)(plain, unit_task, batch)
    torch.testing.assert_close(grad_scaled["w1"], grad_plain["w1"] * task[SCALE_PREFIX + "w1"])


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_batched_loss_and_grad_matches_per_problem_autograd(activation: str) -> None:
    family = MLPImageTaskFamily(hidden_sizes=(16, 8), batch_size=12, param_scale_range=(0.1, 10.0),
                                activation=activation, dtype=torch.float64)
    generator = torch.Generator().manual_seed(4)
    tasks = [family.sample_task(generator) for _ in range(3)]
    params = [{key: value + 0.1 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
               for key, value in family.init_params(task, generator).items()} for task in tasks]  # non-zero biases
    batches = [{key: value[0] for key, value in family.sample_batches(task, generator, 1).items()} for task in tasks]
    loss, grads = family.loss_and_grad(stack_dicts(params), stack_dicts(tasks), stack_dicts(batches))
    assert loss.shape == (3,) and set(grads) == set(family.param_shapes)
    for member, (own_params, task, batch) in enumerate(zip(params, tasks, batches)):
        leaves = {key: value.clone().requires_grad_() for key, value in own_params.items()}
        expected_loss = family.loss(leaves, task, batch)
        expected = torch.autograd.grad(expected_loss, list(leaves.values()))
        # Cross-entropy of the scaled MLP, written out with plain torch ops.
        h = batch["inputs"]
        for layer in range(family.num_layers):
            weight = own_params[f"w{layer}"] * task[f"scale/w{layer}"]
            h = h @ weight + own_params[f"b{layer}"] * task[f"scale/b{layer}"]
            h = (torch.relu(h) if activation == "relu" else torch.tanh(h)) if layer < family.num_layers - 1 else h
        torch.testing.assert_close(expected_loss, torch.nn.functional.cross_entropy(h, batch["labels"]))
        torch.testing.assert_close(loss[member], expected_loss, rtol=1e-12, atol=1e-12)
        for key, value in zip(leaves, expected):
            torch.testing.assert_close(grads[key][member], value, rtol=1e-10, atol=1e-12)


def test_normalized_loss_clips_and_caps_nonfinite(family: MLPImageTaskFamily) -> None:
    log_c = math.log(10)
    raw = torch.tensor([-1.0, 0.0, log_c, 2 * log_c, float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.0, 1.0, 1.5, 1.5, 1.5, 1.5], dtype=torch.float64)
    torch.testing.assert_close(family.normalized_loss(raw), expected)


def test_a_local_file_is_a_dataset_name(tmp_path: Path) -> None:
    """A config's ``task.dataset`` may name an .npz file (or a saved datasets folder) next to built-in names."""
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, images=rng.integers(0, 256, (50, 12, 12), dtype=np.uint8), labels=np.arange(50) % 10)
    family = MLPImageTaskFamily(datasets=["digits", str(path)], batch_size=5, cache_dir=str(tmp_path / "cache"))
    assert family.dataset_sizes[1] == 40 and family.num_classes == 10 and family.config()["datasets"][1] == str(path)
    own = load_image_dataset(str(path), 8, "train", cache_dir=tmp_path / "cache")
    task = {"dataset": torch.tensor(1), **{SCALE_PREFIX + key: torch.tensor(1.0) for key in family.param_shapes}}
    batch = family.sample_batches(task, torch.Generator().manual_seed(0), 2)
    rows = batch["inputs"].reshape(-1, 64)
    assert (rows[:, None, :] == own.images[None]).all(dim=-1).any(dim=-1).all()  # every row from the file


def test_invalid_family_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown task family"):
        build_task_family("no_such_family")
    with pytest.raises(ValueError, match="param_scale_range"):
        MLPImageTaskFamily(param_scale_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="activation"):
        MLPImageTaskFamily(activation="sigmoid")


def test_linear_regression_deterministic_mode() -> None:
    family = build_task_family("linear_regression", num_features=3, deterministic=True, dtype="float64")
    assert isinstance(family, LinearRegressionTaskFamily)
    draws = []
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        task = family.sample_task(generator)
        draws.append((task, family.init_params(task, generator), family.sample_batches(task, generator, 2)))
    for a, b in zip(*draws):
        assert all(torch.equal(a[key], b[key]) for key in a)
    task, _, batch = draws[0]
    torch.testing.assert_close(batch["targets"], batch["inputs"] @ task["target"])
    exact = {"w": task["target"] / task[SCALE_PREFIX + "w"]}
    assert float(family.loss(exact, task, {key: value[0] for key, value in batch.items()})) < 1e-24


# ----------------------------------------------------------------------------- families beyond the MLP
def cnn_family() -> CNNImageTaskFamily:
    return CNNImageTaskFamily(channels=(4, 8), batch_size=16, param_scale_range=(0.5, 2.0), dtype=torch.float64)


def lm_family() -> CharLMTaskFamily:
    return CharLMTaskFamily(text=DEFAULT_TEXT, context_length=16, model_dim=16, num_heads=2, num_layers=2,
                            batch_size=8, segment_length=600, param_scale_range=(0.5, 2.0), dtype=torch.float64)


FAMILIES = {"cnn_image": cnn_family, "char_lm": lm_family}


def draw(family, seed: int, num_steps: int = 1):
    generator = torch.Generator().manual_seed(seed)
    task = family.sample_task(generator)
    return task, family.init_params(task, generator), family.sample_batches(task, generator, num_steps)


def test_cnn_kernels_are_hwio_and_compute_like_torch_modules() -> None:
    family = cnn_family()
    assert family.param_shapes == {"conv0_w": (3, 3, 1, 4), "conv0_b": (4,), "conv1_w": (3, 3, 4, 8),
                                   "conv1_b": (8,), "head_w": (8, 10), "head_b": (10,)}
    task, params, batch = draw(family, 0)
    assert {key: tuple(value.shape) for key, value in params.items()} == family.param_shapes
    assert batch["inputs"].shape == (1, 16, 64) and family.loss_scale == pytest.approx(math.log(10))
    # He-like init over the kernel's fan-in (3·3·in), as an nn.Conv2d weight in HWIO would get from haiku
    weight = params["conv1_w"] * task[SCALE_PREFIX + "conv1_w"]
    assert 0.5 / math.sqrt(36) < float(weight.std()) < 1.0 / math.sqrt(36) and float(weight.abs().max()) <= 2 / 6
    # The same network from nn modules, each weight taken to PyTorch's layout (OIHW, (out, in)).
    real = scaled(params, task)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).double()
    with torch.no_grad():
        for index, layer in ((0, 0), (2, 1)):
            model[index].weight.copy_(real[f"conv{layer}_w"].permute(3, 2, 0, 1))
            model[index].bias.copy_(real[f"conv{layer}_b"])
        model[6].weight.copy_(real["head_w"].T)
        model[6].bias.copy_(real["head_b"])
    images, labels = batch["inputs"][0].reshape(16, 1, 8, 8), batch["labels"][0]
    expected = torch.nn.functional.cross_entropy(model(images), labels)
    torch.testing.assert_close(family.loss(params, task, {"inputs": batch["inputs"][0], "labels": labels}), expected)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_few_sgd_steps_lower_the_loss(name: str) -> None:
    family = FAMILIES[name]()
    task, params, batches = draw(family, 1, num_steps=1)
    batch = {key: value[0] for key, value in batches.items()}
    scales = {key: task[SCALE_PREFIX + key] for key in params}
    start = float(family.loss(params, task, batch))
    for _ in range(10):  # on one batch, with the step divided by s² (plain SGD on the unscaled parameters)
        grads = torch.func.grad(family.loss)(params, task, batch)
        params = {key: value - 0.5 * grads[key] / scales[key] ** 2 for key, value in params.items()}
    assert float(family.loss(params, task, batch)) < 0.8 * start


@pytest.mark.parametrize("name", list(FAMILIES))
def test_vmap_over_two_tasks_equals_each_tasks_loss(name: str) -> None:
    family = FAMILIES[name]()
    draws = [draw(family, seed) for seed in (2, 3)]
    tasks, params, batches = ([item[index] for item in draws] for index in range(3))
    batches = [{key: value[0] for key, value in batch.items()} for batch in batches]
    loss, grads = family.loss_and_grad(stack_dicts(params), stack_dicts(tasks), stack_dicts(batches))
    assert loss.shape == (2,) and not torch.equal(loss[0], loss[1])
    for member in range(2):
        torch.testing.assert_close(loss[member], family.loss(params[member], tasks[member], batches[member]))
        own = torch.func.grad(family.loss)(params[member], tasks[member], batches[member])
        for key, value in own.items():
            torch.testing.assert_close(grads[key][member], value)


def test_char_lm_windows_vocabulary_and_model() -> None:
    family = lm_family()
    vocab_size, blocks, _ = make_char_data(DEFAULT_TEXT, 16)
    assert family.vocab_size == vocab_size  # lopt_hf.evaluation.lm's character vocabulary
    assert family.loss_scale == pytest.approx(math.log(vocab_size))
    assert family.param_shapes["embed"] == (vocab_size, 16) and family.param_shapes["l1_qkv_w"] == (16, 48)
    assert family.param_shapes["head_w"] == (16, vocab_size) and family.param_shapes["pos"] == (16, 16)
    task, params, batch = draw(family, 0, num_steps=3)
    assert {key: tuple(value.shape) for key, value in params.items()} == family.param_shapes
    tokens = batch["tokens"]
    assert tokens.shape == (3, 8, 17)
    # every window lies inside the task's segment of the text, and is the text's characters
    offset = int(task["offset"])
    text = "".join(family.vocab[index] for index in family.ids[offset:offset + 600].tolist())
    for window in tokens.reshape(-1, 17):
        assert "".join(family.vocab[index] for index in window.tolist()) in text
    offsets = {int(family.sample_task(torch.Generator().manual_seed(seed))["offset"]) for seed in range(4)}
    assert len(offsets) == 4  # tasks differ in data
    # a uniform first guess: the normalised loss starts near 1
    first = family.loss(params, task, {"tokens": tokens[0]})
    assert 0.95 < float(family.normalized_loss(first)) < 1.05
    # the causal attention is SDPA's, and a character never sees the ones after it
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
               for seed in range(3))
    torch.testing.assert_close(causal_attention(q, k, v),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    real = {key: value * task[SCALE_PREFIX + key] for key, value in params.items()}
    changed = tokens[0].clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % vocab_size
    before, after = family.logits(real, tokens[0, :, :16]), family.logits(real, changed[:, :16])
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_char_lm_needs_one_text(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of text=, text_file= and corpus="):
        CharLMTaskFamily()
    with pytest.raises(ValueError, match="cannot read it as UTF-8"):
        CharLMTaskFamily(text_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        CharLMTaskFamily(text=DEFAULT_TEXT, model_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="segment_length"):
        CharLMTaskFamily(text=DEFAULT_TEXT, context_length=32, segment_length=32)
    path = tmp_path / "text.txt"
    path.write_text("abcab" * 20, encoding="utf-8")
    family = build_task_family("char_lm", text_file=str(path), context_length=8)
    assert family.vocab == ["a", "b", "c"] and family.config()["text_file"] == str(path)
