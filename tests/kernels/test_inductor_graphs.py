"""InductorGraphs: a function of tensors compiled once per input signature (meta-training's inner step,
deployment's compiled pieces), and PieceFeatures, whose pieces those graphs get."""

from __future__ import annotations

import warnings

import pytest
import torch

from lopt_hf.kernels.inductor_graphs import InductorGraphs
from lopt_hf.rules.features import FactoredFeatures, PieceFeatures, SKINNY_COMPILE_OPTIONS


def scaled_sum(weights: dict[str, torch.Tensor], pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.tanh(pair[0] * weights["a"] + pair[1]), (pair[0] * pair[1]).sum(0)


def test_one_graph_per_signature_equal_to_the_function() -> None:
    graphs = InductorGraphs(scaled_sum, options=SKINNY_COMPILE_OPTIONS, what="a test function")
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(5, 3, generator=gen)}
    x, y = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        result = graphs(weights, (x, y))
        again = graphs(weights, (2 * x, y))  # same signature: the same graph
        assert len(graphs) == 1
        transposed = graphs(weights, (x.t().contiguous().t(), y))  # other strides: a graph of their own
        assert len(graphs) == 2
    expected = scaled_sum(weights, (x, y))
    for actual, wanted in zip((result[0], *result[1]), (expected[0], *expected[1])):
        torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again[0], scaled_sum(weights, (2 * x, y))[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(transposed[0], result[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="every argument leaf must be a tensor"):
        graphs(weights, (x, 3))


def test_a_graph_that_cannot_be_built_warns_once_and_runs_eagerly_or_raises() -> None:
    """An Inductor option that does not exist makes every build fail."""
    broken = {"no_such_inductor_option": True}
    x = torch.randn(4, 3)
    graphs = InductorGraphs(torch.sin, options=broken, what="the sine")
    with pytest.warns(RuntimeWarning, match="compiling the sine failed"):
        assert torch.equal(graphs(x), torch.sin(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(graphs(x), torch.sin(x))  # remembered: no second warning
    assert len(graphs) == 0
    with pytest.raises(Exception):
        InductorGraphs(torch.sin, options=broken, what="the sine", fall_back=False)(x)


def test_piece_features_cut_every_source_to_the_piece() -> None:
    """Tensors, (row, col) pairs and a dataclass of them are cut to the piece, leading (decay) axes kept."""
    param = torch.arange(12.0).reshape(4, 3)
    momentum = torch.stack([param, 10 * param])  # (2, 4, 3)
    row = torch.arange(3.0).expand(2, 4, 3)
    fac = FactoredFeatures((row, row), None, row, row, row, row)
    features = PieceFeatures(lambda p, m, f: [p.unsqueeze(0), m, f.grad_factor[0]], (param, momentum, fac), (4, 3))
    piece = (slice(1, 3),)
    p, m, f = features.at(piece)
    assert torch.equal(p, param[1:3]) and torch.equal(m, momentum[:, 1:3])
    assert f.momentum_factor is None and torch.equal(f.grad_factor[1], row[:, 1:3]) and torch.equal(f.rsqrt_col,
                                                                                                   row[:, 1:3])
    parts = features(piece)
    assert [tuple(part.shape) for part in parts] == [(1, 2, 3), (2, 2, 3), (2, 2, 3)]
    with pytest.raises(TypeError, match="a feature source must be"):
        PieceFeatures(lambda x: [x], ([param],), (4, 3)).at(piece)
