"""Pixel arrays: colour to grayscale in ``[0, 1]``, and resizing by area averaging.

Every source of :mod:`lopt_hf.data` ends up here, so all datasets are preprocessed the same way
whatever format their images come in (8-bit or float, with or without a channel axis).
"""

from __future__ import annotations

import numpy as np

_CHANNEL_COUNTS = (1, 3, 4)  # gray, RGB, RGBA


def gray_batch(images: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` float64 images in ``[0, 1]`` from a stacked batch of images.

    Accepts ``(N, H, W)``, channels-last ``(N, H, W, C)`` or channels-first ``(N, C, H, W)`` with
    ``C`` in 1, 3, 4 (colour: the mean of the R, G, B channels; alpha is dropped). Integer pixels are
    8-bit (divided by 255); float and boolean pixels are taken as already in ``[0, 1]``.
    """
    images = np.asarray(images)
    divisor = 255.0 if np.issubdtype(images.dtype, np.integer) else 1.0
    gray = images.astype(np.float64)
    if gray.ndim == 4 and gray.shape[-1] in _CHANNEL_COUNTS:
        gray = gray[..., :3].mean(axis=-1)
    elif gray.ndim == 4 and gray.shape[1] in _CHANNEL_COUNTS:
        gray = gray[:, :3].mean(axis=1)
    elif gray.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W), (N, H, W, C) or (N, C, H, W) with C in "
                         f"{_CHANNEL_COUNTS}, got {images.shape}")
    return gray / divisor


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
