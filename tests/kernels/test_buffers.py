"""The kernels' reused buffers (lopt_hf.kernels.buffers): one memory per name, grown to the largest request."""

from __future__ import annotations

import torch

from lopt_hf.kernels.buffers import Buffers


def test_a_name_is_the_same_memory_at_every_call_in_any_shape() -> None:
    buffers = Buffers()
    like = torch.empty(0)
    first = buffers.get("features", (3, 4), like)
    assert first.shape == (3, 4) and first.is_contiguous() and first.dtype == torch.float32
    again = buffers.get("features", (2, 5), like)  # fits: a view of the same memory
    assert again.shape == (2, 5) and again.data_ptr() == first.data_ptr()
    other = buffers.get("hidden", (3, 4), like)
    assert other.data_ptr() != first.data_ptr()
    grown = buffers.get("features", (7, 7), like)  # larger: the buffer grows, and is kept from then on
    assert grown.numel() == 49 and buffers.get("features", (1,), like).data_ptr() == grown.data_ptr()
    half = buffers.get("features", (3, 4), torch.empty(0, dtype=torch.float64))  # one buffer per dtype
    assert half.dtype == torch.float64 and half.data_ptr() != grown.data_ptr()


def test_a_request_over_the_limit_gets_a_fresh_tensor() -> None:
    buffers = Buffers(limit=10)
    like = torch.empty(0)
    assert buffers.fits(10) and not buffers.fits(11)
    small = buffers.get("x", (10,), like)
    assert buffers.get("x", (2, 5), like).data_ptr() == small.data_ptr()
    large = buffers.get("x", (11,), like)
    assert large.shape == (11,) and buffers.get("x", (11,), like).data_ptr() != large.data_ptr()
    assert buffers.get("x", (10,), like).data_ptr() == small.data_ptr()  # the kept buffer is untouched
    assert Buffers(limit=None).fits(1 << 40)
