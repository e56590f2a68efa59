"""Named buffers a deployment kernel reuses from call to call for its temporaries.

A per-element rule's step builds temporaries of a piece's (or a tensor's) size: features, hidden
activations. Allocated fresh each time, multi-MB tensors cost page faults as large as their work
whenever the C allocator hands the memory back to the OS in between (glibc does so for blocks above
its mmap threshold, which stays low in a process that has freed no larger block). A kernel's
:class:`Buffers` keeps one flat tensor per name, device and dtype, grown to the largest request,
and hands out views of it: the same memory every call, so the same numbers without the faults.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# Floats per reused buffer by default (16 MB); larger requests get a fresh tensor.
BUFFER_LIMIT = 1 << 22


class Buffers:
    """One reusable flat tensor per ``(name, device, dtype)``; ``get`` views its first elements in a shape.

    The contents are not kept between calls (each caller overwrites what it reads); the memory is held
    for the kernel's life, at most the largest request of each name. Requests of more than ``limit``
    elements get a fresh tensor instead (a whole large tensor's temporaries are not worth holding).
    """

    def __init__(self, limit: int | None = BUFFER_LIMIT) -> None:
        self.limit = limit
        self._buffers: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def fits(self, numel: int) -> bool:
        """Whether a request of ``numel`` elements is served from a reused buffer."""
        return self.limit is None or numel <= self.limit

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A contiguous ``shape`` tensor on ``like``'s device and dtype, the same memory at every call with ``name``."""
        numel = math.prod(shape)
        if not self.fits(numel):
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        key = (name, like.device, like.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)

    def lender(self, like: Tensor) -> Callable[[str, tuple[int, ...]], Tensor]:
        """``buffer(name, shape)`` on ``like``'s device and dtype (:data:`lopt_hf.rules.features.Buffer`)."""
        return lambda name, shape: self.get(name, shape, like)
