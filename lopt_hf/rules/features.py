"""Building blocks shared by several update rules.

Accumulators (momenta, rms, factored second moments), per-tensor second-moment
normalisation, tanh time embeddings and the per-element MLP. All functions are pure and
vmap-friendly (no in-place ops, no data-dependent Python control flow).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# Timescales of learned_optimization's tanh step embedding.
TIME_SCALES: tuple[float, ...] = (1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5)

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function called ``name`` (relu, tanh, gelu, silu)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def tanh_time_features(step: Tensor) -> Tensor:
    """``tanh(step / tau - 1)`` for each timescale tau → shape ``(*step.shape, 11)``."""
    scales = torch.tensor(TIME_SCALES, dtype=torch.float32, device=step.device)
    return torch.tanh(step.unsqueeze(-1) / scales - 1.0)


def ema(accumulator: Tensor, value: Tensor, decay: Tensor | float) -> Tensor:
    """Exponential moving average without bias correction: ``d*acc + (1-d)*value``."""
    return decay * accumulator + (1.0 - decay) * value


def second_moment_scale(x: Tensor, dims: list[int] | tuple[int, ...], eps: float) -> Tensor:
    """``rsqrt(eps + mean(x**2))`` over ``dims`` (kept), the factor of second-moment normalisation."""
    return torch.rsqrt(eps + torch.mean(torch.square(x), dim=tuple(dims), keepdim=True))


def chunk_slices(num_rows: int, chunk_size: int | None) -> Iterator[slice]:
    """Row slices covering ``range(num_rows)`` in chunks of at most ``chunk_size`` (all if None)."""
    if chunk_size is None or chunk_size >= num_rows:
        yield slice(0, num_rows)
        return
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))


def mlp_forward(theta: dict[str, Tensor], x: Tensor, num_layers: int, activation: Callable[[Tensor], Tensor],
                prefix: str = "") -> Tensor:
    """Apply an MLP stored as ``{prefix}w{i}`` (in, out) and ``{prefix}b{i}`` to ``x[..., in]``.

    The activation follows every layer but the last.
    """
    h = x
    for layer in range(num_layers):
        h = h @ theta[f"{prefix}w{layer}"] + theta[f"{prefix}b{layer}"]
        if layer < num_layers - 1:
            h = activation(h)
    return h


def truncated_normal_init(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> Tensor:
    """Normal(0, std) truncated at two standard deviations (haiku's default initialiser)."""
    out = torch.empty(shape, dtype=torch.float32)
    torch.nn.init.trunc_normal_(out, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=generator)
    return out * std
