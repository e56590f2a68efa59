"""The one per-element MLP engine (lopt_hf.rules.features): bias-folded matrices, run element-major by the
feature-input rules (bias_folded_mlp through streamed_mlp) and feature-major by Celo2 (folded_layers)."""

from __future__ import annotations

import pytest
import torch

from lopt_hf.rules.features import (StreamHooks, activation_fn, bias_folded_mlp, bias_folded_weights,
                                    element_major_weights, feature_mean_squares, folded_layers, normalized_mlp,
                                    row_sum_squares, streamed_mlp, tracing_for_inductor, unrolled_mlp, unrolls,
                                    writes_skinny_products, written_out_mlp)


def textbook_mlp(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], act) -> torch.Tensor:
    """(N, in) → (N, out): ``act(x @ W + b)`` between layers."""
    for position, (weight, bias) in enumerate(layers):
        x = x @ weight + bias
        if position < len(layers) - 1:
            x = act(x)
    return x


def random_layers(sizes: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(a, b, generator=gen, dtype=torch.float64), torch.randn(b, generator=gen, dtype=torch.float64))
            for a, b in zip(sizes[:-1], sizes[1:])]


@pytest.mark.parametrize("activation, act", [("relu", torch.relu), ("tanh", torch.tanh)])
@pytest.mark.parametrize("sizes", [[4, 2], [5, 7, 2], [6, 8, 8, 3]])
@pytest.mark.parametrize("in_place", [False, True])
def test_bias_folded_mlp_is_the_textbook_mlp(sizes: list[int], activation: str, act, in_place: bool) -> None:
    """Also with deployment's in-place activations (each applied once: tanh twice would be another network)."""
    layers = random_layers(sizes, seed=len(sizes))
    x = torch.randn(50, sizes[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    features = torch.cat([x.t(), torch.ones(1, 50, dtype=torch.float64)])  # (in + 1, N), last row 1
    folded = bias_folded_mlp(features, element_major_weights(layers), activation, in_place=in_place)
    torch.testing.assert_close(folded, textbook_mlp(x, layers, act).t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation, act", [("relu", torch.relu), ("tanh", torch.tanh)])
@pytest.mark.parametrize("sizes", [[3, 64, 2], [4, 2], [5, 7, 2], [3, 12, 12, 2]])
def test_written_out_network_is_the_textbook_mlp(sizes: list[int], activation: str, act) -> None:
    """What compilation traces (no constant row nor carry units, biases added; a wide hidden layer stays a
    matrix product)."""
    layers = random_layers(sizes, seed=len(sizes))
    x = torch.randn(50, sizes[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    written = written_out_mlp(list(x.t()), element_major_weights(layers), activation)
    torch.testing.assert_close(written, textbook_mlp(x, layers, act).t(), rtol=1e-12, atol=1e-12)


def test_only_compilation_writes_skinny_products() -> None:
    assert not writes_skinny_products()  # eager results never change
    with tracing_for_inductor():
        assert writes_skinny_products()
    assert not writes_skinny_products()


def test_folded_layers_deployment_options_change_no_bit() -> None:
    """In-place activations, the last layer into ``out`` and scratch buffers give the plain result exactly;
    a batch ``(B, units, N)`` gives each member's (to rounding)."""
    gen = torch.Generator().manual_seed(3)
    matrices = bias_folded_weights([(torch.randn(9, 6, generator=gen), torch.randn(6, generator=gen)),
                                    (torch.randn(6, 1, generator=gen), torch.randn(1, generator=gen))], torch.relu)
    h = torch.randn(10, 300, generator=gen)
    plain = folded_layers(h.clone(), matrices, "relu")
    out = torch.empty(1, 300)
    buffers: list[torch.Tensor] = []

    def scratch(layer: int, shape: tuple[int, int]) -> torch.Tensor:
        buffers.append(torch.empty(shape))
        return buffers[-1]

    deployed = folded_layers(h.clone(), matrices, "relu", in_place=True, out=out, scratch=scratch)
    assert deployed.data_ptr() == out.data_ptr() and torch.equal(out, plain) and len(buffers) == 1
    batch = torch.stack([h, 2 * h])
    batched = folded_layers(batch, matrices, "relu")
    # (a batched product is another BLAS call: on some CPUs — MKL's kernels on AMD EPYC — it sums in another order)
    torch.testing.assert_close(batched[0], plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batched[1], folded_layers(2 * h, matrices, "relu"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_element_major_deployment_options_change_no_bit(activation: str) -> None:
    """bias_folded_mlp with in-place activations and biases and every product in a scratch buffer ``(N, units)``
    (no carry unit: the network's own widths) gives the plain result exactly, and it equals the feature-major
    network with its carry units to rounding."""
    gen = torch.Generator().manual_seed(3)
    layers = [(torch.randn(9, 32, generator=gen), torch.randn(32, generator=gen)),
              (torch.randn(32, 7, generator=gen), torch.randn(7, generator=gen)),
              (torch.randn(7, 2, generator=gen), torch.randn(2, generator=gen))]
    matrices = bias_folded_weights(layers, activation_fn(activation))
    weights = element_major_weights(layers)
    x = torch.cat([torch.randn(9, 300, generator=gen), torch.ones(1, 300)])
    plain = bias_folded_mlp(x, weights, activation)
    buffers: list[torch.Tensor] = []

    def scratch(layer: int, shape: tuple[int, int]) -> torch.Tensor:
        buffers.append(torch.empty(shape))
        return buffers[-1]

    deployed = bias_folded_mlp(x, weights, activation, in_place=True, scratch=scratch)
    assert [tuple(buffer.shape) for buffer in buffers] == [(300, 32), (300, 7), (300, 2)]
    assert deployed.data_ptr() == buffers[-1].data_ptr() and torch.equal(deployed, plain)
    feature_major = folded_layers(matrices[0].contiguous() @ x, [m.contiguous() for m in matrices[1:]], activation)
    torch.testing.assert_close(plain, feature_major, rtol=1e-5, atol=1e-5)


def test_streamed_mlp_pieces_and_out_buffer_equal_one_piece() -> None:
    gen = torch.Generator().manual_seed(4)
    layers = [(torch.randn(3, 5, generator=gen), torch.randn(5, generator=gen)),
              (torch.randn(5, 2, generator=gen), torch.randn(2, generator=gen))]
    weights = element_major_weights(layers)
    features = torch.cat([torch.randn(3, 100, generator=gen), torch.ones(1, 100)])

    def readout(out: torch.Tensor) -> torch.Tensor:
        return out[0] * torch.exp(out[1])

    whole = streamed_mlp([slice(0, 100)], lambda index: features[:, index], weights, "relu", readout)
    pieces = [slice(0, 30), slice(30, 64), slice(64, 100)]
    assert torch.equal(streamed_mlp(pieces, lambda index: features[:, index], weights, "relu", readout), whole)
    buffer = torch.empty(100)
    assert torch.equal(streamed_mlp(pieces, lambda index: features[:, index], weights, "relu", readout, out=buffer),
                       whole)



@pytest.mark.parametrize("activation, act", [("relu", torch.relu), ("tanh", torch.tanh)])
@pytest.mark.parametrize("sizes", [[4, 2], [5, 7, 2], [6, 8, 8, 3]])
def test_unrolled_mlp_is_the_textbook_mlp(sizes: list[int], activation: str, act) -> None:
    """The unit-by-unit network the compiled step runs (one tensor per input) is the same MLP."""
    layers = random_layers(sizes, seed=len(sizes))
    x = torch.randn(3, 17, sizes[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outputs = unrolled_mlp(list(x.unbind(-1)), layers, activation)  # inputs (3, 17) each
    assert outputs.shape == (sizes[-1], 3, 17)
    expected = textbook_mlp(x.reshape(-1, sizes[0]), layers, act).t().reshape(sizes[-1], 3, 17)
    torch.testing.assert_close(outputs, expected, rtol=1e-12, atol=1e-12)


def test_eager_execution_never_unrolls() -> None:
    """Outside torch.compile the engine keeps its matrix products, so eager results never depend on it."""
    assert not unrolls(random_layers([4, 2], seed=0))


def test_stream_hooks_refuse_a_buffer_without_an_out_buffer() -> None:
    """With reused buffers the network's last activations are a buffer's: the result must be copied into ``out``."""
    with pytest.raises(ValueError, match="out buffer"):
        StreamHooks(buffer=lambda name, shape: torch.empty(shape))
    StreamHooks(buffer=lambda name, shape: torch.empty(shape), out=torch.empty(4))


def test_given_mean_squares_replace_the_first_pass() -> None:
    """A kernel that computed the features' mean squares itself (feature_mean_squares, compiled) skips the
    streamed first pass — and with it the advance hook, which that pass calls: the two are refused together."""
    gen = torch.Generator().manual_seed(5)
    rows, g = torch.randn(3, 1, 30, generator=gen), torch.randn(20, 30, generator=gen)

    def features(index: tuple) -> list[torch.Tensor]:
        return [g[index].unsqueeze(0), rows.expand(3, 20, 30)[(slice(None), *index)], torch.tanh(g[index]).unsqueeze(0)]

    theta = {"w0": torch.randn(7, 6, generator=gen), "b0": torch.randn(6, generator=gen),
             "w1": torch.randn(6, 2, generator=gen), "b1": torch.randn(2, generator=gen)}
    constant, readout = torch.randn(2, generator=gen), (lambda out: out[0] * torch.exp(out[1]))
    streamed = normalized_mlp(theta, features, g.shape, constant, 2, readout, chunk_size=64)
    mean_square = feature_mean_squares(features, g.numel())
    given = normalized_mlp(theta, features, g.shape, constant, 2, readout, chunk_size=64,
                           hooks=StreamHooks(mean_square=mean_square))
    torch.testing.assert_close(given, streamed, rtol=1e-5, atol=1e-7)
    garbled = normalized_mlp(theta, features, g.shape, constant, 2, readout, chunk_size=64,
                             hooks=StreamHooks(mean_square=2 * mean_square))
    assert not torch.allclose(garbled, streamed)  # the given mean squares are the ones used
    with pytest.raises(ValueError, match="advance"):
        StreamHooks(mean_square=mean_square, advance=lambda index: None)


@pytest.mark.parametrize("no_grad", [False, True])
def test_row_sum_squares_of_broadcast_parts_is_the_materialised_sum(no_grad: bool) -> None:
    """A factored feature is an expand-ed view; its rows' sums of squares, computed over its distinct elements
    times their repeats, are those of the materialised tensor (float64: the same up to rounding), and the sums
    of a part that is not broadcast are computed as they always were."""
    gen = torch.Generator().manual_seed(3)
    along_row = torch.rand(3, 1, 7, generator=gen, dtype=torch.float64).expand(3, 5, 7)
    along_col = torch.rand(3, 5, 1, generator=gen, dtype=torch.float64).expand(3, 5, 7)
    both = torch.rand(2, 1, 1, generator=gen, dtype=torch.float64).expand(2, 5, 7)
    for part in (along_row, along_col, both, along_row[:, 1:4], along_col[:, :, 2:6]):
        torch.testing.assert_close(row_sum_squares(part, no_grad),
                                   torch.square(part.contiguous()).sum(dim=(1, 2)), rtol=1e-12, atol=0)
    plain = torch.randn(4, 6, 5, generator=gen)
    assert torch.equal(row_sum_squares(plain, no_grad), torch.square(torch.linalg.vector_norm(plain, dim=(1, 2)))
                       if no_grad else torch.sum(torch.square(plain), dim=(1, 2)))
    vector = torch.randn(4, generator=gen)  # a (k,) part: one element per row
    assert torch.equal(row_sum_squares(vector, no_grad), torch.square(vector) if not no_grad
                       else torch.square(torch.linalg.vector_norm(vector.unsqueeze(-1), dim=(1,))))
