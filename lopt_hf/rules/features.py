"""Building blocks shared by several update rules.

Accumulators (momenta, rms, factored second moments), per-tensor second-moment
normalisation, tanh time embeddings and the per-element MLP. All functions are pure and
vmap-friendly (no in-place ops on their inputs, no data-dependent Python control flow).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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


def mlp_theta_shapes(layer_sizes: list[int], prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Shapes of an MLP's ``{prefix}w{i}`` (in, out) and ``{prefix}b{i}`` for the given widths."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, (fan_in, fan_out) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:])):
        shapes[f"{prefix}w{layer}"] = (int(fan_in), int(fan_out))
        shapes[f"{prefix}b{layer}"] = (int(fan_out),)
    return shapes


def mlp_flops(weight_shapes: Iterable[tuple[int, ...]]) -> int:
    """FLOPs per element of a network made of these weight matrices (the last two dims are (in, out);
    a leading axis of mixed networks is ignored: they are averaged once per tensor)."""
    return sum(2 * int(shape[-2]) * int(shape[-1]) for shape in weight_shapes)


def numbered_layers(shapes: dict[str, tuple[int, ...]]) -> list[tuple[int, int]]:
    """``(in, out)`` of the weights ``w0``, ``w1``, … among theta ``shapes``, in layer order."""
    numbered = {int(key[1:]): shape for key, shape in shapes.items() if key[0] == "w" and key[1:].isdigit()}
    return [(int(numbered[layer][-2]), int(numbered[layer][-1])) for layer in sorted(numbered)]


def init_mlp_theta(shapes: dict[str, tuple[int, ...]], generator: torch.Generator | None,
                   weight_init: str = "haiku") -> dict[str, Tensor]:
    """Random weights for every 2-D entry of ``shapes``, zeros for the rest (biases, offsets).

    ``weight_init``: ``"haiku"`` — truncated normal with std 1/sqrt(fan_in) (haiku's Linear
    default, used by learned_optimization); ``"normal"`` — unit normal (the JAX tutorial).
    """
    theta = {}
    for key, shape in shapes.items():
        if len(shape) != 2:
            theta[key] = torch.zeros(shape, dtype=torch.float32)
        elif weight_init == "haiku":
            theta[key] = truncated_normal_init(shape, 1.0 / math.sqrt(shape[0]), generator)
        elif weight_init == "normal":
            theta[key] = torch.randn(shape, generator=generator, dtype=torch.float32)
        else:
            raise ValueError(f"unknown weight_init {weight_init!r}; use 'haiku' or 'normal'")
    return theta


def truncated_normal_init(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> Tensor:
    """Normal(0, std) truncated at two standard deviations (haiku's default initialiser)."""
    out = torch.empty(shape, dtype=torch.float32)
    torch.nn.init.trunc_normal_(out, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=generator)
    return out * std


# --------------------------------------------------------------------------- compiled (unrolled) MLP
# Per-element networks with at most this many multiply-adds per element (Celo's and VeLO's 30→4→4→3:
# 148) are written out unit by unit when compiled (:func:`unrolls`): Inductor then fuses features,
# network and readout into a few loops over the elements that never write a feature matrix (Celo's
# step on the 1.59M-parameter MLP, `lopt-hf bench --compile`: 2.3× faster). Wider networks stay matrix
# products, written as broadcast products where they are skinny (:func:`compiled_skinny_product`:
# per_param_mlp's 3→64→2, 320) or left to BLAS (small_fc_lopt's 39→32→32→2, 2,336: BLAS-bound).
UNROLL_MACS = 256

# Products of a per-element network whose inner dimension is at most SKINNY_INNER become unrolled broadcast
# products, those with at most SKINNY_OUTER output columns a multiply-and-reduce (:func:`skinny_matmul`), where a
# compiler fuses them with their neighbours: meta-training's compiled inner step and ``compile=True``.
SKINNY_INNER = 8
SKINNY_OUTER = 4

# Inductor options of the compiled steps with skinny products. Inductor realises (writes out) a pointwise value
# read by several consumers once it reads more than 4 inputs; the per-element MLP's hidden layer reads 8 (4
# features, 4 weights) and feeds one reduction per output column. Inlined, the fused loop computes it once and
# never stores it: ~25 % faster steps for per_param_mlp (measured, same process, 1 thread, 32 members).
SKINNY_COMPILE_OPTIONS = {"realize_reads_threshold": 64}

# The same with multiply-adds contracted (-ffp-contract=fast), for steps whose cost is a network written out
# with skinny products (:func:`written_out_mlp`): its fused loop is bound by the CPU's add and multiply pipes,
# and a fused multiply-add moves each add onto the multiply pipe. Measured: per_param_mlp's meta-training kernel
# 2.26 → 1.76 ms (32 members × 9,610 elements, 1 thread); its compile=True step on the bench MLP 14.2 → 12.3 ms
# (means of 3 alternating runs). Rounding differs from eager (as it does anyway).
CONTRACTED_SKINNY_COMPILE_OPTIONS = {**SKINNY_COMPILE_OPTIONS, "cpp.enable_floating_point_contract_flag": "fast"}


def is_skinny(inner: int, outer: int) -> bool:
    """Whether a product with this inner dimension and this many output columns is one :func:`skinny_matmul`
    writes out."""
    return 0 < inner <= SKINNY_INNER or (inner > 0 and outer <= SKINNY_OUTER)


def sum_of_outer_products(columns: list[Tensor], b: Tensor) -> Tensor:
    """``Σ_k columns[k] · b[..., k, :]`` for columns ``(..., n, 1)``: ``[columns] @ b`` as broadcast products, one
    per inner index (the columns need not lie in one matrix)."""
    out = columns[0] * b[..., 0:1, :]
    for k in range(1, len(columns)):
        out = out + columns[k] * b[..., k:k + 1, :]
    return out


def skinny_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D or batched) as broadcast products when one side is skinny (:func:`is_skinny`), else
    ``NotImplemented`` (what a decomposition table reads as "leave it to aten")."""
    inner, outer = a.shape[-1], b.shape[-1]
    if not is_skinny(inner, outer):  # (an empty sum, e.g. a scheduler without per-tensor summaries, too)
        return NotImplemented
    if inner <= SKINNY_INNER:
        return sum_of_outer_products([a[..., k:k + 1] for k in range(inner)], b)
    # One multiply-and-reduce over K per output column, rows contiguous: Inductor vectorises
    # over rows, inlines a's producer into every column and fuses the columns into one loop
    # (so the producer is computed once). Columns are stacked on a leading axis and
    # transposed back, so each column stays contiguous for the consumer (h[:, 0], h[:, 1]).
    a_t = a.transpose(-1, -2)
    columns = [(a_t * b[..., :, j:j + 1]).sum(-2) for j in range(outer)]
    return torch.stack(columns, dim=-2).transpose(-1, -2)


_compiled_traces = 0  # open tracing_for_inductor() blocks


@contextlib.contextmanager
def tracing_for_inductor() -> Iterator[None]:
    """Marks a ``make_fx`` trace whose graph Inductor compiles (meta-training's compiled inner step), where
    ``torch.compiler.is_compiling()`` is False: per-element networks are written as inside ``torch.compile``
    (:func:`writes_skinny_products`)."""
    global _compiled_traces
    _compiled_traces += 1
    try:
        yield
    finally:
        _compiled_traces -= 1


def writes_skinny_products() -> bool:
    """Whether per-element networks write their skinny products out (:func:`compiled_skinny_product`,
    :func:`written_out_mlp`): inside ``torch.compile`` (``LearnedOptimizer(compile=True)``) or a trace for
    Inductor (:func:`tracing_for_inductor`); never eagerly."""
    return _compiled_traces > 0 or torch.compiler.is_compiling()


def compiled_skinny_product(a: Tensor, b: Tensor) -> Tensor | None:
    """When compiling (:func:`writes_skinny_products`), a skinny product ``a @ b`` of a per-element network as
    :func:`skinny_matmul`; otherwise None (the caller's matrix product: eager results never change with this
    switch)."""
    if not writes_skinny_products():
        return None
    product = skinny_matmul(a, b)
    return None if product is NotImplemented else product


def unrolls(layers: list[tuple[Tensor, Tensor]]) -> bool:
    """Whether a network of ``(weight (in, out), bias)`` layers is evaluated by :func:`unrolled_mlp`:
    only inside ``torch.compile`` (:mod:`lopt_hf.kernels.compiled`) and for networks of at most
    :data:`UNROLL_MACS` multiply-adds per element. Eager execution never unrolls (one kernel per unit
    and input would be slow), so eager results do not change with this switch."""
    return torch.compiler.is_compiling() and mlp_flops(weight.shape for weight, _ in layers) <= 2 * UNROLL_MACS


def unrolled_mlp(rows: list[Tensor], layers: list[tuple[Tensor, Tensor]], activation: str) -> Tensor:
    """The MLP of ``(weight (in, out), bias)`` layers on inputs given as one tensor per input ``rows``
    (all of one shape), written unit by unit: ``h_j = b_j + Σ_k x_k·W_kj``, the activation between
    layers. Returns the outputs stacked, ``(out, *shape)``. The same network as
    :func:`bias_folded_mlp` (sums in another order: float rounding), for :func:`unrolls`."""
    act = activation_fn(activation)
    h = rows
    for index, (weight, bias) in enumerate(layers):
        if index:
            h = [act(x) for x in h]
        units = []
        for unit in range(int(weight.shape[1])):
            total = h[0] * weight[0, unit] + bias[unit]
            for k in range(1, len(h)):
                total = total + h[k] * weight[k, unit]
            units.append(total)
        h = units
    return torch.stack(h)


# --------------------------------------------------------------------------- streaming MLP
# Elements per chunk of the per-element MLP in deployment. Measured on the 2-core reference
# machine over all tensors of a 512→1024→1024→10 MLP (1.59M parameters), ms per step for chunk
# sizes 4K / 8K / 16K / 32K / 64K / 128K — small_fc_lopt: 140 / 117 / 95 / 90 / 85 / 149,
# mlp_lopt: 77 / 63 / 57 / 57 / 55 / 55, per_param_mlp: 42 / 39 / 42 / 44 / 39 / 39. Small
# chunks pay Python overhead per chunk (~80 ops each); at 128K small_fc_lopt's per-chunk
# buffers (tens of MB) make glibc hand memory back and forth to the OS (page faults every
# step). 32K sits clear of that cliff, ~5 % from the best.
DEFAULT_CHUNK_SIZE = 32768


def factored_dims(shape: tuple[int, ...] | torch.Size) -> tuple[int, int] | None:
    """``(d1, d0)``: the second-largest and the largest dim, as learned_optimization picks them.

    ``None`` for tensors with fewer than two dims (they keep a full second-moment vector).
    Ties go to the lower index first, which is what ``numpy.argsort`` does for the short
    arrays a shape is (it sorts them by a stable insertion sort), so of two equal dims the
    later one counts as the largest.
    """
    if len(shape) < 2:
        return None
    # a stable insertion sort of the axes by size, written out: torch.compile traces the comparisons
    # (it guards on them) but not ``sorted`` with a key over symbolic sizes
    order = list(range(len(shape)))
    for position in range(1, len(order)):
        while position > 0 and shape[order[position - 1]] > shape[order[position]]:
            order[position - 1], order[position] = order[position], order[position - 1]
            position -= 1
    return order[-2], order[-1]


def factored_accumulator_state(shape: tuple[int, ...], num_decays: int,
                               zeros: Callable[[int, tuple[int, ...]], Tensor]) -> dict[str, Tensor]:
    """Zero adafactor accumulators (decay axis first): ``v_row``/``v_col`` over the two largest
    dims (:func:`factored_dims`), or a full ``v_diag`` for tensors with fewer than two dims.

    ``zeros(count, shape)`` allocates one accumulator (lets a rule choose memory order).
    """
    dims = factored_dims(shape)
    if dims is None:
        return {"v_diag": zeros(num_decays, shape)}
    d1, d0 = dims
    return {"v_row": zeros(num_decays, shape[:d0] + shape[d0 + 1:]),
            "v_col": zeros(num_decays, shape[:d1] + shape[d1 + 1:])}


def safe_rsqrt(x: Tensor) -> Tensor:
    """``rsqrt(max(x, 1e-9))``: learned_optimization's guarded inverse square root."""
    return torch.rsqrt(torch.clamp(x, min=1e-9))


def squared_gradient(grad: Tensor) -> Tensor:
    """``g² + 1e-30``, the input of the factored second moments: one full-size tensor (the sum is taken in
    place on the fresh square — the same bits; autograd and vmap allow it, the square saves only ``g``)."""
    return (grad * grad).add_(1e-30)


def factored_second_moments(grad_sqr: Tensor, state: dict[str, Tensor], ema: Callable[[Tensor, Tensor], Tensor],
                            lead_axes: int = 0) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
    """Adafactor's factored second moments (learned_optimization's ``factored_dims`` accumulators).

    ``grad_sqr``: ``(*lead, *shape)``, ``g² + 1e-30`` of one tensor (``lead_axes`` leading axes,
    e.g. a stack). ``state``: ``v_row``/``v_col`` or ``v_diag`` of
    :func:`factored_accumulator_state` (decay axis first, then the lead axes). ``ema(old, new)``
    returns ``decay·old + (1 − decay)·new`` per decay (rounded as the caller's rule does).

    Returns the new accumulators and the preconditioner factors: ``(row_factor, col_factor)`` with
    ``row_factor = rsqrt(v_row / mean_d1(v_row))`` (constant along ``d0``) and
    ``col_factor = rsqrt(v_col)`` (constant along ``d1``) — their product preconditions each element
    — or ``(rsqrt(v_diag + 1e-9),)`` for tensors with fewer than two dims.
    """
    dims = factored_dims(tuple(grad_sqr.shape[lead_axes:]))
    if dims is None:
        v_diag = ema(state["v_diag"], grad_sqr)
        return {"v_diag": v_diag}, (safe_rsqrt(v_diag + 1e-9),)
    d1, d0 = dims
    v_row = ema(state["v_row"], torch.mean(grad_sqr, dim=lead_axes + d0))
    v_col = ema(state["v_col"], torch.mean(grad_sqr, dim=lead_axes + d1))
    # axis d1 inside v_row (which lacks d0), shifted by the decay and lead axes
    row_axis_d1 = (d1 - 1 if d1 > d0 else d1) + 1 + lead_axes
    row_col_mean = torch.mean(v_row, dim=row_axis_d1, keepdim=True)
    return {"v_row": v_row, "v_col": v_col}, (safe_rsqrt(v_row / (row_col_mean + 1e-9)), safe_rsqrt(v_col))


Factor = Tensor | tuple[Tensor, Tensor]  # one preconditioner, or a (row, col) pair whose product is one


@dataclasses.dataclass(frozen=True)
class FactoredFeatures:
    """The factored second moments as per-element features, all broadcast views of ``(k, *shape)``
    (decay axis first; nothing of full size is allocated): the preconditioners of ``g`` and of the
    momentum (for ≥ 2-D tensors the same ``(row, col)`` pair, multiplied per chunk), ``row`` / ``col``
    and their ``rsqrt(· + 1e-8)`` — learned_optimization's adafactor features, shared by
    ``small_fc_lopt`` and ``celo``."""

    grad_factor: Factor
    momentum_factor: Factor | None  # None: the same as grad_factor (≥ 2-D tensors)
    row: Tensor
    col: Tensor
    rsqrt_row: Tensor
    rsqrt_col: Tensor

    def grad_factor_at(self, at: tuple) -> Tensor:
        """The preconditioner of ``g`` at ``at`` (an index whose first entry covers the decays)."""
        return factor_at(self.grad_factor, at)

    def momentum_factor_at(self, at: tuple, grad_factor: Tensor) -> Tensor:
        """The momentum's preconditioner at ``at``; ``grad_factor`` (:meth:`grad_factor_at`) is reused when equal."""
        return grad_factor if self.momentum_factor is None else factor_at(self.momentum_factor, at)


def factor_at(factor: Factor, at: tuple) -> Tensor:
    """``factor[at]``, or ``row[at] * col[at]`` for a pair."""
    return factor[0][at] * factor[1][at] if isinstance(factor, tuple) else factor[at]


def factored_features(accumulators: dict[str, Tensor], factors: tuple[Tensor, ...], shape: tuple[int, ...],
                      diag_momentum_factor: Callable[[Tensor], Tensor]) -> FactoredFeatures:
    """:class:`FactoredFeatures` from :func:`factored_second_moments`' accumulators and factors.

    Tensors with fewer than two dims use their full ``v_diag`` for row and col, ``factors[0]`` for
    ``g`` and ``diag_momentum_factor(v_diag)`` for the momentum (the rules differ there:
    ``(v + 1e-6)^-½`` in small_fc_lopt, ``v^-½`` in Celo).
    """
    dims = factored_dims(shape)
    if dims is None:
        v_diag = accumulators["v_diag"]
        rsqrt = torch.rsqrt(v_diag + 1e-8)
        return FactoredFeatures(factors[0], diag_momentum_factor(v_diag), v_diag, v_diag, rsqrt, rsqrt)
    d1, d0 = dims
    full = (accumulators["v_row"].shape[0], *shape)

    def along_row(x: Tensor) -> Tensor:
        return x.unsqueeze(1 + d0).expand(full)

    def along_col(x: Tensor) -> Tensor:
        return x.unsqueeze(1 + d1).expand(full)

    v_row, v_col = accumulators["v_row"], accumulators["v_col"]
    pair = (along_row(factors[0]), along_col(factors[1]))
    return FactoredFeatures(pair, None, along_row(v_row), along_col(v_col), along_row(torch.rsqrt(v_row + 1e-8)),
                            along_col(torch.rsqrt(v_col + 1e-8)))


def chunk_indices(shape: tuple[int, ...] | torch.Size, chunk_size: int | None,
                  whole_trailing_axes: int = 0) -> list[tuple]:
    """Basic-index tuples that split a tensor of ``shape`` into row-major pieces of ≤ ``chunk_size``.

    The one chunker of the per-element networks: every piece is a contiguous range of the
    flattened tensor and the pieces come in order, so concatenating their flattened contents gives
    the flattened tensor back. ``[()]`` (the whole tensor) when ``chunk_size`` is None or the tensor
    fits. Indexing with these tuples gives views, also of broadcast (``expand``-ed) tensors.

    The last ``whole_trailing_axes`` axes are never split (a piece may then exceed ``chunk_size``:
    one index of the axes before them).
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    if chunk_size is None or numel <= chunk_size or numel == 0:
        return [()]
    chunk_size = max(1, int(chunk_size))
    # Find the axis to slice: the trailing dims after it fit into one chunk (or must stay whole), it does not.
    inner, axis = 1, len(shape) - 1
    while axis >= 0 and (inner * int(shape[axis]) <= chunk_size or axis >= len(shape) - whole_trailing_axes):
        inner *= int(shape[axis])
        axis -= 1
    if axis < 0:  # every axis stays whole
        return [()]
    rows = max(1, chunk_size // inner)
    pieces: list[tuple] = []
    for lead in itertools.product(*(range(int(size)) for size in shape[:axis])):
        for start in range(0, int(shape[axis]), rows):
            pieces.append(lead + (slice(start, min(start + rows, int(shape[axis]))),))
    return pieces


# A buffer lent by a deployment kernel: ``buffer(name, shape)`` is a float32 tensor of ``shape`` on the
# computation's device, the same memory at every call with that name (its contents are not kept).
Buffer = Callable[[str, tuple[int, ...]], Tensor]
# ``scratch(layer, shape)``: a buffer for layer ``layer``'s product as it lies in memory (``shape``), or None
# (:func:`bias_folded_mlp`, :func:`folded_layers`).
Scratch = Callable[[int, tuple[int, int]], "Tensor | None"]


@dataclasses.dataclass
class StreamHooks:
    """What a deployment kernel (``lopt_hf.kernels``) lends :func:`normalized_mlp`; meta-training passes none.

    ``advance(index)`` is called once per piece before its features are first built (the kernel advances
    the piece's state in place there); ``out`` is a flat buffer of ``numel`` floats the result is written
    into (no concatenated copy); ``buffer`` holds each piece's feature matrix and hidden activations, reused
    from piece to piece and step to step: fresh multi-MB tensors per piece cost page faults as large as
    their work when the C allocator hands the memory back to the OS in between (glibc does for a process
    that has freed no larger block, e.g. an optimizer benchmark), and the same numbers either way.
    """

    advance: Callable[[tuple], None] | None = None
    out: Tensor | None = None
    buffer: Buffer | None = None
    # The features' per-tensor mean squares, computed by the kernel beforehand (its first pass over the whole
    # tensor, fused by torch.compile: :func:`feature_mean_squares`); the streamed first pass is then skipped.
    mean_square: Tensor | None = None
    # Under compile=True: ``compiled_pieces(build, readout)`` is :func:`piece_network` of that ``build`` and
    # ``readout`` (``(weights, sources) -> (n,)``) compiled once per signature of its inputs, kept by the kernel from
    # step to step (None once compiling has failed); features given as :class:`PieceFeatures` with a skinny first
    # layer then run their pieces through it.
    compiled_pieces: Callable[[Callable[..., list[Tensor]], Callable[[Tensor], Tensor]],
                              Callable[[ElementMajorWeights, tuple], Tensor] | None] | None = None

    def __post_init__(self) -> None:
        if self.buffer is not None and self.out is None:  # else the result could be a view of a reused buffer
            raise ValueError("StreamHooks.buffer needs an out buffer for the result")
        if self.mean_square is not None and self.advance is not None:
            raise ValueError("StreamHooks.advance is called by the first pass, which a given mean_square skips")


def normalized_mlp(
    theta: dict[str, Tensor],
    features: Callable[[tuple], list[Tensor]],
    shape: tuple[int, ...] | torch.Size,
    constant_inputs: Tensor,
    num_layers: int,
    readout: Callable[[Tensor], Tensor],
    chunk_size: int | None = None,
    eps: float = 1e-5,
    hooks: StreamHooks | None = None,
) -> Tensor:
    """learned_optimization's per-element ReLU MLP on per-tensor normalised features, streamed.

    ``features(index)`` returns the per-element features of ``tensor[index]`` as a list of
    ``(k_i, *piece_shape)`` tensors (broadcast views are fine), ``F = sum(k_i)`` in all. Each
    feature is normalised over the whole tensor, ``x * rsqrt(eps + mean(x**2))``, then
    ``constant_inputs`` (the same for every element, e.g. time features) are appended and the
    ReLU MLP ``w{i}`` (in, out), ``b{i}`` is applied; ``readout`` maps the ``(out, N)`` network
    output to ``(N,)``. Returns a tensor of ``shape``.

    Only float rounding separates this from the textbook evaluation:

    * the normalisation is folded into the first layer, ``(x * s) @ W == x @ (s[:, None] * W)``,
      and the constant inputs into its bias, so with ``chunk_size`` the features are built per
      chunk — twice, once for the mean squares and once for the network — and never for the
      whole tensor; with ``chunk_size=None`` (what vmap/grad use) they are built once;
    * every bias rides inside its matmul: the features get a constant-1 row and each hidden
      layer a constant-1 unit (weights 0, bias 1, and ReLU(1) = 1) that carries the next
      layer's bias. A bias added by ``addmm`` costs a full pass over the activations; this
      way the chunk runs as three plain matmuls and two in-place ReLUs.

    Inside ``torch.compile`` (``LearnedOptimizer(compile=True)``), a small network (:func:`unrolls`) of the
    whole tensor is written out unit by unit instead (:func:`unrolled_mlp`), so the compiled step builds no
    feature matrix at all.

    Deployment kernels (``lopt_hf.kernels``) pass :class:`StreamHooks`.
    """
    hooks = hooks or StreamHooks()
    advance, out, buffer = hooks.advance, hooks.out, hooks.buffer
    pieces = chunk_indices(shape, chunk_size)
    numel = 1
    for size in shape:
        numel *= int(size)
    # Deployment runs without autograd: then cheaper kernels that have no (or a singular)
    # backward may be used — in-place ReLU and a norm for the sum of squares.
    no_grad = not torch.is_grad_enabled()

    def feature_matrix(index: tuple) -> Tensor:  # (F + 1, N), last row all ones
        parts = features(index)
        if buffer is None:
            x = torch.cat([*parts, torch.ones_like(parts[0][:1])])
        else:
            x = buffer("features", (sum(int(part.shape[0]) for part in parts) + 1, *parts[0].shape[1:]))
            torch.cat(parts, out=x[:-1])
            x[-1].fill_(1.0)
        return x.reshape(x.shape[0], -1)

    w0 = theta["w0"]
    layers = [(w0, theta["b0"])] + [(theta[f"w{layer}"], theta[f"b{layer}"]) for layer in range(1, num_layers)]
    if len(pieces) == 1 and advance is None and out is None and unrolls(layers):
        return _unrolled_normalized_mlp(features(pieces[0]), layers, constant_inputs, readout, eps, shape)
    whole = None
    if hooks.mean_square is not None:
        mean_square = hooks.mean_square
    elif len(pieces) == 1:
        if advance is not None:
            advance(pieces[0])
        whole = feature_matrix(pieces[0])
        mean_square = feature_sum_squares([whole[:-1]], no_grad) / max(numel, 1)
    else:
        sum_square = None
        for index in pieces:
            if advance is not None:
                advance(index)
            # Reduce each part where it lies: no concatenated copy on this pass.
            part = feature_sum_squares(features(index), no_grad)
            sum_square = part if sum_square is None else sum_square + part
        mean_square = sum_square / max(numel, 1)
    weights = element_major_weights(normalized_first_layer(layers, mean_square, constant_inputs, eps))
    # the activations of layer k into "hidden" (even k) or "features" (odd k: the piece's features are dead once
    # the first layer has read them): two buffers for any depth
    scratch = None if buffer is None else (
        lambda layer, layer_shape: buffer("features" if layer % 2 else "hidden", layer_shape))
    network = None
    if (hooks.compiled_pieces is not None and isinstance(features, PieceFeatures) and out is not None
            and is_skinny(int(mean_square.shape[0]), int(w0.shape[1]))):
        network = hooks.compiled_pieces(features.build, readout)  # (None: compiling failed)
    if network is not None:
        return written_pieces(pieces, lambda index: network(weights, features.at(index)), out).reshape(shape)
    result = streamed_mlp(pieces, (lambda index: whole) if whole is not None else feature_matrix, weights, "relu",
                          readout, in_place=no_grad, out=out, scratch=scratch)
    return result.reshape(shape)


@dataclasses.dataclass(frozen=True)
class PieceFeatures:
    """A rule's per-element features as a function of pieces of its input tensors: ``features(index)`` (what
    :func:`normalized_mlp` takes) is ``build(*at(index))``, ``sources`` (a tree of tensors: the parameter, its
    gradient, the accumulators, :class:`FactoredFeatures`) cut to the piece ``index`` of a tensor of ``shape``
    (a leading decay axis kept). ``build`` is the rule's own function of whole pieces, the same for every
    tensor and step, so a compiled piece (:func:`piece_network`) is one graph per piece shape."""

    build: Callable[..., list[Tensor]]
    sources: tuple
    shape: tuple[int, ...]

    def at(self, index: tuple) -> tuple:
        """The sources cut to ``tensor[index]``: a source with more axes than the tensor keeps its leading ones."""
        return _cut(self.sources, index, len(self.shape))

    def __call__(self, index: tuple) -> list[Tensor]:
        return self.build(*self.at(index))


def _cut(source: Any, index: tuple, rank: int) -> Any:
    """``source`` (a tensor, or a tuple or dataclass of them, or None) cut to ``[index]`` of a rank-``rank`` tensor,
    leading axes beyond ``rank`` kept. By hand rather than ``pytree.tree_map`` (50 µs for three tensors: ten times
    the indexing, per piece of every tensor at every step)."""
    if isinstance(source, Tensor):
        return source[(slice(None),) * (source.dim() - rank) + index]
    if isinstance(source, tuple):
        return tuple(_cut(item, index, rank) for item in source)
    if dataclasses.is_dataclass(source):
        return type(source)(**{field.name: _cut(getattr(source, field.name), index, rank)
                               for field in dataclasses.fields(source)})
    if source is None:
        return None
    raise TypeError(f"a feature source must be a tensor, a tuple or dataclass of them, or None; got {type(source)}")


def piece_network(build: Callable[..., list[Tensor]], readout: Callable[[Tensor], Tensor], weights: ElementMajorWeights,
                  sources: tuple) -> Tensor:
    """The normalised network's output ``(n,)`` on one piece, from its sources (:class:`PieceFeatures`) and
    :func:`element_major_weights` (normalisation and constant inputs folded in): the features one
    tensor each, the network :func:`written_out_mlp`, ``readout``. What ``compile=True`` runs per piece of
    a feature-input rule whose first layer is skinny (:func:`is_skinny`: mlp_lopt's 5 features, the time features
    folded into the bias): compiled, the features and the first layer fuse into one loop that stores only the
    hidden activations — no feature matrix —, a wide hidden product stays a BLAS call, and the output layer and
    readout fuse into one more loop. mlp_lopt on the bench MLP: 75–77 → 48–51 ms per step. small_fc_lopt's 28
    features written out measured slower than its feature matrix through BLAS (100–108 against 96–99 ms), so it
    keeps the eager network."""
    rows = [row.reshape(-1) for part in build(*sources) for row in part.unbind(0)]
    return readout(written_out_mlp(rows, weights, "relu"))


def feature_mean_squares(features: Callable[[tuple], list[Tensor]], numel: int) -> Tensor:
    """``(F,)``: each feature's mean square over the whole tensor of ``numel`` elements, ``features`` as for
    :func:`normalized_mlp` (what its first pass computes piece by piece). Under ``torch.compile`` the features
    are never materialised: one fused pass over the inputs (a kernel's compiled first pass,
    :attr:`StreamHooks.mean_square`)."""
    return feature_sum_squares(features(())) / max(numel, 1)


def feature_sum_squares(parts: list[Tensor], no_grad: bool = False) -> Tensor:
    """``(F,)``: each feature's sum of squares over a piece, from its parts ``(k_i, …)`` (:func:`row_sum_squares`)."""
    return torch.cat([row_sum_squares(part, no_grad) for part in parts])


def row_sum_squares(part: Tensor, no_grad: bool = False) -> Tensor:
    """``(x**2).sum()`` of each row ``x`` of a ``(k, …)`` feature part, ``(k,)``.

    A broadcast part (an ``expand``-ed view: a factored moment along a tensor's rows or columns) is reduced
    where it lies — its distinct elements, the sum times how often each repeats — not over every element
    it stands for (small_fc_lopt's 12 factored features of a 32×1024 piece: 3K elements each instead of
    96K). ``no_grad``: a norm for the sum of squares (one kernel; its backward at 0 is singular).
    """
    repeats = 1
    for dim in range(1, part.dim()):
        if part.stride(dim) == 0 and part.shape[dim] > 1:
            repeats *= int(part.shape[dim])
            part = part.narrow(dim, 0, 1)
    part = part.unsqueeze(-1) if part.dim() == 1 else part  # dim=() would mean "all dims"
    dims = tuple(range(1, part.dim()))
    sums = (torch.square(torch.linalg.vector_norm(part, dim=dims)) if no_grad
            else torch.sum(torch.square(part), dim=dims))
    return sums * repeats if repeats > 1 else sums


def normalized_first_layer(layers: list[tuple[Tensor, Tensor]], mean_square: Tensor, constant_inputs: Tensor,
                           eps: float) -> list[tuple[Tensor, Tensor]]:
    """``layers`` with the per-feature normalisation ``x·rsqrt(eps + mean(x²))`` folded into the first layer's
    rows, ``(x·s) @ W == x @ (s[:, None]·W)``, and the constant inputs (the rows after the ``F`` features)
    folded into its bias."""
    (w0, b0), rest = layers[0], layers[1:]
    num_features = mean_square.shape[0]
    first_weight = w0[:num_features] * torch.rsqrt(eps + mean_square).unsqueeze(-1)
    first_bias = b0 + constant_inputs.to(w0.dtype) @ w0[num_features:]
    return [(first_weight, first_bias), *rest]


def _unrolled_normalized_mlp(parts: list[Tensor], layers: list[tuple[Tensor, Tensor]], constant_inputs: Tensor,
                             readout: Callable[[Tensor], Tensor], eps: float,
                             shape: tuple[int, ...] | torch.Size) -> Tensor:
    """:func:`normalized_mlp` of the whole tensor through :func:`unrolled_mlp` (inside ``torch.compile``):
    one tensor per feature, each feature's mean square a reduction of its own (Inductor computes them in one
    pass), the normalisation and constant inputs folded into the first layer as the eager path folds them."""
    rows = [torch.broadcast_to(row, shape) for part in parts for row in part.unbind(0)]
    mean_square = torch.stack([torch.sum(torch.square(row)) for row in rows]) / max(rows[0].numel(), 1)
    outputs = unrolled_mlp(rows, normalized_first_layer(layers, mean_square, constant_inputs, eps), "relu")
    return readout(outputs.reshape(outputs.shape[0], -1)).reshape(shape)


def streamed_mlp(pieces: list[tuple], feature_matrix: Callable[[tuple], Tensor], weights: ElementMajorWeights,
                 activation: str, readout: Callable[[Tensor], Tensor], in_place: bool = False,
                 out: Tensor | None = None, scratch: Scratch | None = None) -> Tensor:
    """The per-element MLP of the feature-input rules, streamed: piece by piece (:func:`chunk_indices`),
    ``feature_matrix(index)`` ``(F + 1, n)`` — one row per input, the last row all ones — through
    :func:`bias_folded_mlp` with ``weights`` (:func:`element_major_weights`), ``readout`` maps the
    ``(out, n)`` network output to ``(n,)``; the pieces' outputs concatenated, ``(N,)``. Only one
    piece's features and activations exist at a time. ``in_place``: see :func:`bias_folded_mlp`.
    ``out``: a flat ``(N,)`` buffer the pieces' outputs are written into (and returned) instead of
    concatenated; ``scratch``: buffers for the activations (see :func:`bias_folded_mlp`).
    """

    def network(index: tuple) -> Tensor:
        return readout(bias_folded_mlp(feature_matrix(index), weights, activation, in_place=in_place, scratch=scratch))

    return written_pieces(pieces, network, out)


def written_pieces(pieces: list[tuple], network: Callable[[tuple], Tensor], out: Tensor | None) -> Tensor:
    """The pieces' outputs ``network(index)`` ``(n,)`` in order, ``(N,)``: written into the flat buffer ``out``
    (returned), or concatenated when there is none."""
    if out is not None:
        start = 0
        for index in pieces:
            piece = network(index)
            out[start:start + piece.shape[0]].copy_(piece)
            start += piece.shape[0]
        return out
    outputs = [network(index) for index in pieces]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


IN_PLACE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": torch.relu_, "tanh": torch.tanh_}


def bias_folded_weights(layers: list[tuple[Tensor, Tensor]],
                        activation: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """An MLP's ``(weight (in, out), bias)`` layers as bias-free feature-major matrices for :func:`folded_layers`
    (Celo2).

    The input gets a trailing constant 1 and every hidden layer a trailing unit that carries a
    constant: ``[[Wᵀ, b / c], [0 … 0, 1]]`` ``(out + 1, in + 1)`` (the last layer without the carry
    row) where ``c`` is the constant arriving at that layer (1 at the input, ``act(c)`` after each
    hidden layer — exactly 1 for ReLU). Then each bias rides inside its matmul: feature-major, on Celo2's large
    slabs, an ``addmm`` bias costs a full extra pass over the activations. (Element-major networks carry no unit:
    :func:`element_major_weights`.)

    Each matrix is the transpose of a contiguous ``(in + 1, out + 1)`` one (callers take ``.contiguous()`` copies).
    """
    carried = torch.ones((), dtype=layers[0][0].dtype, device=layers[0][0].device)
    matrices = []
    for position, (weight, bias) in enumerate(layers):
        augmented = torch.cat([weight, (bias / carried).unsqueeze(0)])
        if position < len(layers) - 1:
            carry_column = torch.zeros_like(augmented[:, :1])
            carry_column = torch.cat([carry_column[:-1], torch.ones_like(carry_column[-1:])])
            augmented = torch.cat([augmented, carry_column], dim=1)
            carried = activation(carried)
        matrices.append(augmented.t())
    return matrices


# Products with fewer result columns than this are "narrow": MKL multiplies them several times slower than their
# transpose, so element-major weights with such outputs are stored column-major (:func:`element_major_weights`)
# and meta-training's compiled inner step computes them transposed (``metatrain.unroll.narrow_matmul``).
NARROW_COLUMNS = 16
# An element-major network (:func:`element_major_weights`): the first layer's ``[W; b]`` and the later ``(W, b)``.
ElementMajorWeights = tuple[Tensor, list[tuple[Tensor, Tensor]]]


def element_major_weights(layers: list[tuple[Tensor, Tensor]]) -> ElementMajorWeights:
    """An MLP's ``(weight (in, out), bias)`` layers as :func:`bias_folded_mlp` runs them element-major: the first
    layer ``[W; b]`` ``(in + 1, out)``, its bias riding on the features' constant-one row, and the later layers
    ``(W, b)``. No carry unit: one would make every hidden product a column wider than the network, off MKL's
    blocking (small_fc_lopt's 39→32→32→2 on 32,768 elements, 2 threads: 2.4 → 1.8 ms per piece with the bias added
    in cache instead, ≈ 0.05 ms). A weight with a narrow output (fewer than :data:`NARROW_COLUMNS` columns: the
    2-output layer) is stored column-major (the transpose of a contiguous ``(out, in)`` matrix), which MKL
    multiplies 2–3× faster (32,768 × (32 @ 32×2): 0.19 vs 0.55 ms); the others row-major, which a compiled
    written-out layer reads one contiguous row of outputs at a time (column-major there: mlp_lopt's compiled
    pieces 0.27 → 1.17 ms). Made once per tensor; every piece reuses it."""

    def laid_out(weight: Tensor) -> Tensor:
        return weight.t().contiguous().t() if weight.shape[1] < NARROW_COLUMNS else weight.contiguous()

    (first_weight, first_bias), rest = layers[0], layers[1:]
    return (laid_out(torch.cat([first_weight, first_bias.unsqueeze(0)])),
            [(laid_out(weight), bias) for weight, bias in rest])


def bias_folded_mlp(x: Tensor, weights: ElementMajorWeights, activation: str, in_place: bool = False,
                    scratch: Scratch | None = None) -> Tensor:
    """The network of :func:`element_major_weights` on feature-major ``x`` ``(in + 1, N)`` whose last row is 1
    (it carries the first bias), element-major: every product ``(N, in) @ (in, out)``, one element's units
    together. Returns ``(out, N)``. Deployment (2-D ``x``): ``in_place`` rectifies the activations and adds the
    biases in place; ``scratch(layer, (N, units))`` may return a buffer for a layer's product (None: a new tensor)."""
    first, later = weights
    product = compiled_skinny_product(x.t(), first)
    if product is None:
        target = None if scratch is None else scratch(0, (int(x.shape[-1]), int(first.shape[1])))
        product = torch.matmul(x.t(), first) if target is None else torch.mm(x.t(), first, out=target)
    return element_major_layers(product, later, activation, in_place=in_place, scratch=scratch).mT


def element_major_layers(h: Tensor, layers: list[tuple[Tensor, Tensor]], activation: str,
                         in_place: bool = False, scratch: Scratch | None = None) -> Tensor:
    """The layers after the first of an :func:`element_major_weights` network: ``h`` ``(…, N, units)`` the first
    layer's output; returns ``(…, N, out)``. Each layer multiplies ``act(h)`` by its weight (a skinny product
    written out when compiling, :func:`compiled_skinny_product`) and adds its bias. ``in_place`` (deployment, no
    autograd): the activation and bias applied in place; ``scratch`` as for :func:`bias_folded_mlp` (layer
    numbers from 1)."""
    act = IN_PLACE_ACTIVATIONS.get(activation) if in_place else None
    act = act or activation_fn(activation)
    for layer, (weight, bias) in enumerate(layers):
        inputs = act(h)  # (once: an in-place activation such as tanh_ must not run twice)
        product = compiled_skinny_product(inputs, weight)
        if product is None:
            target = None if scratch is None else scratch(layer + 1, (int(h.shape[-2]), int(weight.shape[1])))
            product = torch.matmul(inputs, weight) if target is None else torch.mm(inputs, weight, out=target)
        h = product.add_(bias) if in_place else product + bias
    return h


def written_out_mlp(inputs: list[Tensor], weights: ElementMajorWeights, activation: str) -> Tensor:
    """The network of :func:`element_major_weights` on ``inputs``, one ``(N,)`` tensor per input, as a compiled
    step writes it (per_param_mlp's 3→64→2 under :func:`writes_skinny_products`, mlp_lopt's pieces): no feature
    matrix, no constant input — the first layer one broadcast product per input, its bias added —, the later
    layers :func:`element_major_layers`. Inductor fuses it into one loop over the elements in which each hidden
    unit costs 3 multiply-adds, a ReLU and 2 multiply-adds; with contracted multiply-adds
    (``CONTRACTED_SKINNY_COMPILE_OPTIONS``) that loop is bound by its multiplies. Measured against the folded
    network with its ones row and carry unit (per_param_mlp, 32 members × 9,610 elements, 1 thread): its kernel
    2.26 → 1.76 ms; not building the feature matrix: the tutorial's inner step 14 % and the 784-256-256-10 MLP's
    12 % faster again (2 threads). The same sums in the same order as :func:`bias_folded_mlp` except the first
    bias added last. Returns ``(out, N)``."""
    first, later = weights  # first: (in + 1, out), the last row the bias
    h = sum_of_outer_products([x.unsqueeze(-1) for x in inputs], first[:-1]) + first[-1]
    return element_major_layers(h, later, activation).mT


def folded_layers(h: Tensor, matrices: list[Tensor], activation: str, *, in_place: bool = False,
                  out: Tensor | None = None, scratch: Scratch | None = None) -> Tensor:
    """The layers after the first of a bias-folded network, feature-major: ``h ← matrix @ act(h)`` per matrix
    (:func:`bias_folded_weights`), ``h`` ``(units, N)`` (one unit's N elements together) or a batch
    ``(B, units, N)`` of inputs to the same matrices, the carry units computed: Celo2 after its own first layer
    (per-slab normalisation and broadcast features). The feature-input rules run element-major instead
    (:func:`bias_folded_mlp`).

    Deployment options (no autograd through them), with 2-D ``h``: ``in_place`` rectifies the activations
    in place; ``scratch(layer, (units, N))`` may return a buffer for a layer's product (None: a new tensor);
    ``out`` receives the last layer's output.
    """
    act = IN_PLACE_ACTIVATIONS.get(activation) if in_place else None
    act = act or activation_fn(activation)
    last = len(matrices) - 1
    for layer, matrix in enumerate(matrices):
        target = out if layer == last else None
        if target is None and scratch is not None:
            target = scratch(layer, (matrix.shape[0], h.shape[-1]))
        h = torch.matmul(matrix, act(h)) if target is None else torch.mm(matrix, act(h), out=target)
    return h


@dataclasses.dataclass(frozen=True)
class DirectionMagnitudeReadout:
    """Readout ``direction * exp(magnitude * exp_mult) * step_mult`` of a 2-output network's ``(2, n)`` output. A
    value (equal settings, equal readouts): a compiled piece's graph is kept per readout (:func:`piece_network`)."""

    exp_mult: float
    step_mult: float

    def __call__(self, out: Tensor) -> Tensor:
        return out[0] * torch.exp(out[1] * self.exp_mult) * self.step_mult
