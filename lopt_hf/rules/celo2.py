"""``celo2``: the Celo2 / Celo2-base learned update rule (Moudgil, Knyazev, Belilovsky, arXiv 2602.19142).

A port of ``scale_by_celo2`` (amoudgl/celo ``celo/optimizers/celo2_optax.py``, identical to the
``celo2`` package) that reproduces the original's reference vectors. Per parameter tensor:

1. the gradient is clipped to ±``grad_clip`` (1000) and fed to plain EMAs with *fixed* decays,
   no bias correction: momentum ``m`` (0.9, 0.99, 0.999) of g, ``rms`` (0.95) of g², and
   Adafactor-style factored second moments (0.9, 0.99, 0.999) of ``g² + 1e-30`` — ``row`` / ``col``
   vectors over the two largest dims for tensors with ≥ 2 dims, a full ``diag`` accumulator
   otherwise (as in learned_optimization);
2. 14 feature groups, from the accumulators *after* this step: g, clip(g, ±0.1), p, m×3, rms,
   m·rsqrt(rms+1e-8)×3, rsqrt(rms+1e-8), fac_g×3, g·rsqrt(rms+1e-8), row×3, col×3,
   rsqrt(row+1e-8)×3, rsqrt(col+1e-8)×3, fac_mom_mult×3 (30 numbers); tensors with fewer than
   two dims use only the first 9 groups (15 numbers);
3. every feature is normalised by its second moment over the tensor's **last two axes** only,
   ``x·rsqrt(1e-9 + mean(x²))`` — a 4-D kernel is normalised separately for each leading index;
4. a ReLU MLP, 2 hidden layers × 8 units, 3 outputs. Its first layer is one weight matrix per
   feature group (theta ``w0__0`` … ``w0__13``, products summed, then ``b0``), followed by
   ``w1, b1, w2, b2`` (weights (in, out)); 1-D tensors use ``w0__0`` … ``w0__8`` only;
5. step = direction · exp(magnitude · exp_mult) (exp_mult 0: only the direction counts),
   normalised like the inputs over the last two axes (so it has unit RMS per slab);
6. with ``orthogonalize`` and ≥ 2 dims: Newton–Schulz orthogonalisation (5 iterations,
   coefficients 3.4445, −4.7750, 2.0315, Frobenius normalisation with eps 1e-8, tall matrices
   transposed) of each matrix over the last two axes, then RMS normalisation;
7. times ``rmsmult``. The result is subtracted (``p - lr·step``), like every rule here.

**Layout.** Celo2 is layout-sensitive: the normalisation axes and the row/col roles of the
factored statistics depend on which axis is which. This rule computes in the original's JAX
layout — dense kernels ``(in, out)``, conv kernels ``(*spatial, in, out)`` (HWIO) — and says so
with ``layout_sensitive = True``. ``lopt_hf.LearnedOptimizer`` then hands it each
``nn.Linear`` weight transposed and each convolution weight permuted from OIHW to HWIO and maps
the step back (see :mod:`lopt_hf.layout`); called directly (e.g. by a meta-trainer on JAX-layout
tensors) it uses tensors as given. In practice the mapping matters for conv kernels (torch's
OIHW would be normalised over the spatial axes); for 2-D matrices the rule happens to be
transpose-equivariant (normalisation covers the whole matrix, factored axes are picked by size,
Newton–Schulz commutes with transposition), which the tests check too.

Orthogonalising tensors with more than two dims (conv kernels) treats each leading index as
its own matrix; the reference vectors only pin down the 2-D case.

State per tensor, decay axis first (the JAX state has it last): ``momentum`` (3, *shape),
``rms`` (1, *shape) and either ``v_row`` (3, *shape without d0) and ``v_col`` (3, *shape
without d1), or ``v_diag`` (3, *shape). The arithmetic follows the memory order of the state: a
matrix whose state lies column-major (a transposed view, as :mod:`lopt_hf.kernels.celo2` keeps
it for ``nn.Linear`` weights) is computed column-major, with no transposing copies.

**Speed.** The math is written once, in :meth:`Celo2.update_decay_first`, for meta-training
(vmap/grad) and deployment alike, with fewer passes over memory than the textbook form: feature
mean squares in closed form instead of a first pass over built features, the MLP feature-major
with biases and row/col statistics folded in. The deployment execution,
:class:`lopt_hf.kernels.celo2.Celo2Kernel`, runs the same arithmetic with a :class:`Workspace`:
features, activations and full-size temporaries in reused buffers, the network weights prepared
once, the Newton–Schulz Gram products of large matrices as symmetric blocks. (Running the
element-wise part on one intra-op thread looked 1.45× faster in isolation on the 2-core machine but
was 10 % slower inside ``transformers.Trainer``, so it is not done.) Inside ``torch.compile``
(``LearnedOptimizer(compile=True)``) the network is written out unit by unit instead of as products
(:meth:`Celo2._unrolled_network`): Inductor fuses features, network and readout into one loop per tensor.

**Stacks.** :meth:`Celo2.update_stacked` takes B tensors of one shape stacked on a leading axis
(states too) and returns each tensor's own update: every statistic stays per tensor, the kernels
run batched. ``update`` is the same code on a stack of one, so meta-training (vmap/grad) and
deployment share it; ``LearnedOptimizer`` (through the kernel) stacks a model's same-shape tensors
(a transformer's repeated blocks), which turns hundreds of small kernel calls and their Python
overhead into a few batched ones. A test checks stacked == one at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from .base import State, Theta, UpdateRule, register_rule
from .features import (bias_folded_weights, chunk_indices, factored_accumulator_state, factored_dims,
                       factored_second_moments, folded_layers, mlp_flops, truncated_normal_init,
                       unrolled_mlp)

# Feature groups in the original's order, and how many numbers each contributes (with 3 momentum,
# 1 rms and 3 adafactor decays). The first NUM_GROUPS_1D are used for tensors with < 2 dims.
FEATURE_GROUPS = ("g", "clipped_g", "p", "m", "rms", "m_rsqrt_rms", "rsqrt_rms", "fac_g", "g_rsqrt_rms",
                  "row", "col", "rsqrt_row", "rsqrt_col", "fac_mom_mult")
NUM_GROUPS_1D = 9
HAIKU_PREFIX = "ff_mod_stack/~/"

# ``symmetric_product(y, base, beta, alpha)`` = ``beta·base + alpha·y·yᵀ`` (``base`` None: ``y·yᵀ``).
SymmetricProduct = Callable[[Tensor, "Tensor | None", float, float], Tensor]


class Workspace(Protocol):
    """What a deployment execution lends :meth:`Celo2.update_decay_first` (see
    :class:`lopt_hf.kernels.celo2.Celo2Workspace`): the rule computes the same arithmetic with or
    without one; with one it may write temporaries into reused buffers and fresh tensors in place."""

    symmetric_product: SymmetricProduct | None

    def fits(self, numel: int) -> bool:
        """Whether a temporary of ``numel`` elements goes into a reused buffer (else it is allocated)."""

    def buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A ``shape`` buffer on ``like``'s device and dtype, reused across calls under ``name``."""

    def network_weights(self, order: tuple[int, ...]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """:meth:`Celo2.network_weights` of this execution's theta (computed once per ``order``)."""

    def in_place(self, numel: int) -> bool:
        """Whether a stack of ``numel`` elements is computed in place: its momentum and rms advanced in the
        state handed in, the clipped gradient, its square and ``rsqrt(rms)`` built piece by piece instead of
        whole (large tensors: memory near AdamW's; the same float operations)."""


def newton_schulz(x: Tensor, coeffs: tuple[float, float, float], iterations: int, eps: float,
                  scale: Tensor | None = None, symmetric_product: SymmetricProduct | None = None,
                  overwrite: bool = False) -> Tensor:
    """Orthogonalise the matrices over the last two axes of ``x`` (optax/Muon quintic iteration).

    ``x / (‖x‖_F + eps)``, then ``iterations`` × ``x ← a·x + (b·A + c·A²)·x`` with ``A = x·xᵀ``,
    computed on the wide orientation (tall matrices are transposed and transposed back), so the
    Gram matrix is the small one; ``b·A + c·A²`` and ``a·x + B·x`` are each one fused
    ``addmm``/``baddbmm``. ``scale`` (positive, broadcastable to ``(*lead, 1, 1)``) stands for an
    input ``scale·x``; it is folded into the normalisation, ``x·s / (s·‖x‖_F + eps)``.

    ``symmetric_product(y, base, beta, alpha)`` (``beta·base + alpha·y·yᵀ``; ``base`` may be None),
    given by a deployment kernel (:func:`lopt_hf.kernels.celo2.symmetric_product`), computes the
    symmetric products ``x·xᵀ`` and ``A·A = A·Aᵀ`` of matrices whose Gram side is ≥ 512 instead of
    a plain matmul — the same sums per entry. ``overwrite`` (deployment, no autograd): ``x`` is not needed
    afterwards; it is normalised and iterated in place (its memory holds the result) — two full-size
    matrices fewer alive at a time, the same bits.

    (Taking the iterations in pairs through the Gram side — ``x₂ = Q₁·Q·x`` with ``A₁ = Q·A·Q`` —
    saves a fifth to a third of the flops of wide matrices, but was measured 1.5–3× further from
    float64 than this iteration on nearly low-rank inputs with Gram side ≥ 256, so it is not used.)
    """
    a, b, c = coeffs
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    if scale is None:
        divisor = norm + eps
        x = x.div_(divisor) if overwrite else x / divisor
    else:
        factor = scale / (scale * norm + eps)
        x = x.mul_(factor) if overwrite else x * factor
    lead = x.shape[:-2]
    batch = math.prod(lead)
    # one matrix: addmm; several: one batch axis for baddbmm
    x = x.reshape(x.shape[-2:]) if batch == 1 else x.reshape(batch, *x.shape[-2:])
    fused = torch.addmm if x.dim() == 2 else torch.baddbmm
    blocked = symmetric_product is not None and x.shape[-2] >= 512
    for _ in range(iterations):
        if blocked:
            gram = symmetric_product(x, None, 0.0, 1.0)
            update = symmetric_product(gram, gram, b, c)
        else:
            gram = torch.matmul(x, x.mT)
            update = fused(gram, gram, gram, beta=b, alpha=c)
        del gram  # (one Gram-sized matrix fewer alive while the next x is computed)
        if overwrite:  # x stays in its buffer (one full-size matrix fewer alive, for a copy per iteration)
            x.copy_(fused(x, update, x, beta=a))
        else:
            x = fused(x, update, x, beta=a)
        del update
    x = x.reshape(*lead, *x.shape[-2:])
    return x.mT if transposed else x


def newton_schulz_flops(rows: int, cols: int, iterations: int) -> int:
    """FLOPs of :func:`newton_schulz` on one ``rows × cols`` matrix: per iteration, on the wide
    orientation (``s`` = the smaller side, ``l`` the larger), the Gram ``x·xᵀ`` (2·s²·l), ``A·A`` (2·s³)
    and ``B·x`` (2·s²·l)."""
    small, large = min(rows, cols), max(rows, cols)
    return iterations * (4 * small * small * large + 2 * small ** 3)


@register_rule
@dataclasses.dataclass(frozen=True)
class Celo2(UpdateRule):
    """Celo2's learned MLP update rule (``orthogonalize=True``: Celo2, ``False``: Celo2-base)."""

    name = "celo2"
    # Computes in JAX layout: LearnedOptimizer maps torch Linear/Conv weights to it and back.
    layout_sensitive: ClassVar[bool] = True
    # Inside torch.compile, _network writes the network out unit by unit (_unrolled_network): one fused loop.
    unrolls_when_compiled: ClassVar[bool] = True

    hidden_size: int = 8
    hidden_layers: int = 2
    momentum_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    rms_decays: tuple[float, ...] = (0.95,)
    adafactor_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    grad_clip: float = 1000.0
    exp_mult: float = 0.0
    rmsmult: float = 1.0
    orthogonalize: bool = False
    ns_coeffs: tuple[float, ...] = (3.4445, -4.7750, 2.0315)
    ns_iters: int = 5
    ns_eps: float = 1e-8
    normalization_eps: float = 1e-9

    def __post_init__(self) -> None:
        if int(self.hidden_size) <= 0 or int(self.hidden_layers) < 0:
            raise ValueError(f"hidden_size must be positive and hidden_layers non-negative, got "
                             f"{self.hidden_size}, {self.hidden_layers}")
        if len(self.rms_decays) != 1:
            raise ValueError(f"celo2 uses exactly one rms decay, got {self.rms_decays}")
        if not self.momentum_decays or not self.adafactor_decays:
            raise ValueError("celo2 needs at least one momentum and one adafactor decay")
        # fac_mom_mult multiplies momenta by the factored preconditioners decay by decay.
        if len(self.adafactor_decays) not in (1, len(self.momentum_decays)):
            raise ValueError("adafactor decays must be one or as many as the momentum decays")
        if len(self.ns_coeffs) != 3 or int(self.ns_iters) < 0:
            raise ValueError(f"ns_coeffs must be 3 numbers and ns_iters >= 0, got {self.ns_coeffs}, {self.ns_iters}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive, got {self.grad_clip}")

    # ------------------------------------------------------------------------ theta
    def group_sizes(self) -> list[int]:
        """Numbers per feature group (14 groups; 30 numbers with the default decays)."""
        moms, facs = len(self.momentum_decays), len(self.adafactor_decays)
        return [1, 1, 1, moms, 1, moms, 1, facs, 1, facs, facs, facs, facs, max(moms, facs)]

    def layer_sizes(self) -> list[int]:
        """Output sizes of the MLP's layers: ``hidden_layers`` × ``hidden_size``, then 3."""
        return [int(self.hidden_size)] * int(self.hidden_layers) + [3]

    def theta_shapes(self) -> dict[str, tuple[int, ...]]:
        sizes = self.layer_sizes()
        shapes: dict[str, tuple[int, ...]] = {f"w0__{i}": (size, sizes[0]) for i, size in enumerate(self.group_sizes())}
        shapes["b0"] = (sizes[0],)
        for layer in range(1, len(sizes)):
            shapes[f"w{layer}"] = (sizes[layer - 1], sizes[layer])
            shapes[f"b{layer}"] = (sizes[layer],)
        return shapes

    def init_theta(self, generator: torch.Generator | None = None) -> Theta:
        # haiku: truncated normal with std 1/sqrt(fan_in) (fan_in of the first layer = all 30
        # inputs, for every per-group matrix), zero biases.
        fan_in = sum(self.group_sizes())
        theta = {}
        for key, shape in self.theta_shapes().items():
            if key.startswith("b"):
                theta[key] = torch.zeros(shape, dtype=torch.float32)
            else:
                std = 1.0 / math.sqrt(fan_in if key.startswith("w0__") else shape[0])
                theta[key] = truncated_normal_init(shape, std, generator)
        return theta

    # ------------------------------------------------------------------------ state
    def per_element_flops(self) -> int:
        return mlp_flops(shape for shape in self.theta_shapes().values() if len(shape) == 2)  # all its weights

    def tensor_flops(self, shape: tuple[int, ...]) -> int:
        flops = self.per_element_flops() * math.prod(shape)
        if self.orthogonalize and len(shape) >= 2:  # one matrix per slab of the last two axes
            flops += math.prod(shape[:-2]) * newton_schulz_flops(shape[-2], shape[-1], int(self.ns_iters))
        return flops

    def init_state(self, param: Tensor) -> State:
        shape = tuple(param.shape) if param.dim() > 0 else (1,)

        def zeros(count: int, of_shape: tuple[int, ...]) -> Tensor:
            return torch.zeros((count, *of_shape), dtype=torch.float32, device=param.device)

        facs = len(self.adafactor_decays)
        state = {"momentum": zeros(len(self.momentum_decays), shape), "rms": zeros(1, shape)}
        return state | factored_accumulator_state(shape, facs, zeros)

    # ----------------------------------------------------------------------- update
    stackable: ClassVar[bool] = True  # update_stacked is batched (see the module docstring, "Stacks")

    def update(self, theta: Theta, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
               chunk_size: int | None = None) -> tuple[Tensor, State]:
        # One tensor is a stack of one: the same code, with a leading axis of size 1.
        direction, new_state = self.update_decay_first(
            theta, param.unsqueeze(0), grad.unsqueeze(0), {key: value.unsqueeze(1) for key, value in state.items()},
            step, chunk_size)
        return direction[0], {key: value[:, 0] for key, value in new_state.items()}

    def update_stacked(self, theta: Theta, params: Tensor, grads: Tensor, states: State, step: Tensor | int,
                       chunk_size: int | None = None) -> tuple[Tensor, State]:
        """:meth:`update` for ``B`` tensors of one shape stacked on axis 0 (states too), batched: see
        :meth:`update_decay_first`, which takes the state with the stack axis after the decay axis."""
        direction, new_states = self.update_decay_first(
            theta, params, grads, {key: value.movedim(0, 1) for key, value in states.items()}, step, chunk_size)
        return direction, {key: value.movedim(1, 0) for key, value in new_states.items()}

    def update_decay_first(self, theta: Theta, params: Tensor, grads: Tensor, states: State, step: Tensor | int,
                           chunk_size: int | None = None,
                           workspace: Workspace | None = None) -> tuple[Tensor, State]:
        """:meth:`update` for ``B`` independent tensors of one shape, stacked: ``params`` / ``grads``
        ``(B, *shape)``, every state tensor with the stack axis second, ``(k, B, …)`` (tensor ``i``'s
        state is ``value[:, i]``). Returns ``(B, *shape)`` steps and the new states, stacked alike.

        Every statistic stays per tensor (feature and output normalisation per slab of each tensor,
        factored moments over each tensor's own axes, Newton–Schulz per matrix, the final RMS per
        tensor): the result is each tensor's :meth:`update`, computed with batched kernels and one
        pass of Python for the whole stack (what makes many small tensors cheap in deployment).

        ``workspace`` (a deployment kernel's, :class:`lopt_hf.kernels.celo2.Celo2Kernel`; never under
        autograd or vmap) lets the same arithmetic write into reused buffers and fresh tensors in
        place, use prepared network weights and blocked Newton–Schulz products. Full-size tensors are
        used in the memory order of the state: a matrix whose state lies column-major (a transposed
        view) is computed column-major, with no transposing copies.
        """
        original_shape = params.shape
        stack = params.shape[0]
        if params.dim() == 1:  # as the original: scalars are treated as (1,)
            params, grads = params.reshape(stack, 1), grads.reshape(stack, 1)
        shape = tuple(params.shape[1:])
        ndim = len(shape)
        device = params.device

        # With a workspace (deployment), fresh tensors may be written in place: the same arithmetic,
        # without full-size temporaries.
        deploy = workspace is not None

        def ema(decays: tuple[float, ...], rank: int, old: Tensor, new: Tensor) -> Tensor:
            """``decay·old + (1 − decay)·new`` per decay (leading axis), rounded as the original."""
            decay, keep = _decay_tensors(decays, rank, device)
            if deploy:
                return torch.mul(decay, old).addcmul_(keep, new)
            return torch.addcmul(keep * new, decay, old)

        # --- accumulators (the new state), decay axis first. Every full-size tensor is used in one
        # memory order: row-major, or column-major for a matrix whose state is — then the rule runs
        # on the memory as it lies, with no transposing copies, and so does the step.
        column_major = ndim == 2 and _column_major(states["momentum"][0])

        def in_order(x: Tensor) -> Tensor:
            if not column_major:
                return x.contiguous()
            return x if _column_major(x) else x.mT.contiguous().mT

        def temporary(name: str, like: Tensor) -> Tensor | None:
            """Deployment: a buffer reused across calls, shaped like ``like``, in this update's memory order.

            Full-size temporaries allocated fresh every step cost page faults as large as their work.
            """
            if workspace is None or not workspace.fits(like.numel()):
                return None
            size = tuple(like.shape)
            if column_major:
                return workspace.buffer(name, (*size[:-2], size[-1], size[-2]), like).mT
            return workspace.buffer(name, size, like)

        param = in_order(params)
        if deploy and workspace.in_place(params.numel()):
            # momentum and rms advanced in the state, piece by piece; g, g² and rsqrt(rms) built per piece
            # later (_Inputs); only g² + 1e-30 exists whole, for the factored moments, and briefly
            lazy: tuple[Tensor, float] | None = (in_order(grads), self.grad_clip)
            momentum, rms = self._advance_in_place(lazy[0], in_order(states["momentum"]), in_order(states["rms"]),
                                                   column_major, chunk_size)
            grad_sqr = torch.clamp(lazy[0], -self.grad_clip, self.grad_clip)
            grad_sqr = grad_sqr.mul_(grad_sqr).add_(1e-30)
            g = g2 = rsqrt_rms = None
        else:
            lazy = None
            g = torch.clamp(grads, -self.grad_clip, self.grad_clip, out=temporary("g", grads))
            g = in_order(g)
            g2 = torch.mul(g, g, out=temporary("g2", g))
            # rank: dims after the decay axis (the stack axis and the tensor's own)
            momentum = ema(self.momentum_decays, 1 + ndim, states["momentum"], g)
            rms = ema(self.rms_decays, 1 + ndim, states["rms"], g2)
            rsqrt_rms = torch.add(rms, 1e-8, out=temporary("rsqrt_rms", rms)).rsqrt_() if deploy \
                else torch.rsqrt(rms + 1e-8)
            grad_sqr = torch.add(g2, 1e-30, out=temporary("grad_sqr", g2))
        new_state = {"momentum": momentum, "rms": rms}

        accumulators, factors = factored_second_moments(
            grad_sqr, states, lambda old, new: ema(self.adafactor_decays, old.dim() - 1, old, new), lead_axes=1)
        new_state.update(accumulators)
        del grad_sqr
        dims = factored_dims(shape)  # the tensor's own axes d: axis 1 + d of the stack
        if dims is not None:
            # v_row is constant along d0, v_col along d1; fac_g / fac_mom_mult use row_factor · col_factor
            d1, d0 = dims
            factors = (accumulators["v_row"], factors[0], d0, accumulators["v_col"], factors[1], d1)

        if column_major:  # the EMAs keep their inputs' memory order, but make sure
            momentum, rms = in_order(momentum), in_order(rms)
            new_state.update(momentum=momentum, rms=rms)
        inputs = _Inputs(shape, stack, g, g2, param, momentum, rms, rsqrt_rms, factors, column_major, workspace, lazy)
        direction = self._network(theta, inputs, chunk_size, workspace)
        if self.rmsmult != 1.0:
            direction = direction * self.rmsmult
        return direction.reshape(original_shape), new_state

    def _advance_in_place(self, grads: Tensor, momentum: Tensor, rms: Tensor, column_major: bool,
                          chunk_size: int | None) -> tuple[Tensor, Tensor]:
        """The EMAs of the clipped gradient and its square written into ``momentum`` / ``rms`` ``(k, B, …)``
        (contiguous in this update's memory order, see ``in_order``), piece by piece of the memory: the
        deployment arithmetic of :meth:`update_decay_first` (``decay·old + keep·new``)."""

        def flat(x: Tensor) -> Tensor:  # (lead, N) view in memory order
            return (x.mT if column_major else x).reshape(x.shape[0], -1)

        flat_g, flat_m, flat_rms = flat(grads.unsqueeze(0)), flat(momentum), flat(rms)
        decay, keep = _decay_tensors(self.momentum_decays, 1, grads.device)
        rms_decay, rms_keep = _decay_tensors(self.rms_decays, 1, grads.device)
        for (piece,) in [index or (slice(None),) for index in chunk_indices(flat_g.shape[1:], chunk_size or 1 << 20)]:
            g = torch.clamp(flat_g[:, piece], -self.grad_clip, self.grad_clip)
            flat_m[:, piece].mul_(decay).addcmul_(keep, g)
            flat_rms[:, piece].mul_(rms_decay).addcmul_(rms_keep, torch.mul(g, g))
        return momentum, rms

    # ----------------------------------------------------------------------- network
    def _network(self, theta: Theta, inputs: _Inputs, chunk_size: int | None, workspace: Workspace | None) -> Tensor:
        """Normalised features → MLP → normalised (and maybe orthogonalised) direction, of ``inputs.shape``.

        Whole (``chunk_size=None``, what vmap/grad use) or in pieces of at most ``chunk_size``
        elements, every tensor goes through the same steps:

        1. the mean square of every feature over each slab (see :class:`_Inputs`): for matrices
           (and conv kernels whose channel axes are the largest) in closed form from the
           accumulators, without building the features; otherwise from the features, built once
           (one piece) or piece by piece;
        2. the normalisation folded into the first layer, ``(x·s) @ W == x @ (s[:, None]·W)``,
           one matrix per slab, feature-major (``h = Wᵀ·X``, N contiguous) with a carry unit
           whose constant 1 brings the next layer's bias; the broadcast features (row/col
           statistics, constant along one axis) go through it once per row / column;
        3. per piece, the element-wise features as one (E, N) matrix, the first layer, and the later
           layers through the shared engine (:func:`~lopt_hf.rules.features.folded_layers`);
        4. the output normalised per slab (folded into Newton–Schulz's Frobenius normalisation).
        """
        deploy = workspace is not None
        num_slabs, rows, cols = inputs.num_slabs, inputs.rows, inputs.cols
        slab_size = rows * cols
        pieces = inputs.pieces(chunk_size)
        w0, bias, later = self.network_weights(theta, inputs.order) if workspace is None \
            else workspace.network_weights(inputs.order)

        # 1. per-slab mean squares, in inputs.order: (F, L)
        cached = None
        closed_form = inputs.standard
        parts, running = [], None
        # closed form: no feature matrices, so pieces 4× larger cost no more memory
        for piece in inputs.pieces(None if chunk_size is None else 4 * chunk_size) if closed_form else pieces:
            if closed_form:
                part = inputs.piece_sums(piece)
            else:
                x = inputs.features(piece)
                cached = x if len(pieces) == 1 else None
                part = _slab_dot(x.view(x.shape[0], piece[1] - piece[0], -1), None)  # (E, slabs in the piece)
            if piece[2] == 0 and piece[3] == rows:
                parts.append(part)
            else:  # a row range: sum up the slab
                running = part if running is None else running + part
                if piece[3] == rows:
                    parts.append(running)
                    running = None
        sums = _cat(parts, 1)
        means = [sums / slab_size]
        if inputs.vectors is not None:
            means += [torch.mean(torch.square(vectors), dim=-1) for vectors in inputs.vectors]
        scale = torch.rsqrt(self.normalization_eps + _cat(means, 0))

        # 2. first layer per slab: (L, hidden + 1, E) and the broadcast features' contributions
        weight = scale.t().unsqueeze(-1) * w0  # (L, F, hidden + 1), carry column 0
        count = inputs.num_elementwise
        first = weight[:, :count].mT
        along_rows, along_cols = None, bias.view(1, -1, 1)
        if inputs.vectors is not None:
            by_rows, by_cols = inputs.vectors  # (k, L, R), (k, L, C)
            split = count + by_rows.shape[0]
            along_rows = torch.matmul(weight[:, count:split].mT, by_rows.transpose(0, 1))  # (L, hidden + 1, R)
            along_cols = torch.matmul(weight[:, split:].mT, by_cols.transpose(0, 1)) + along_cols  # (L, hidden + 1, C)

        # 3. the per-element network: unit by unit inside torch.compile (one fused loop), else piece by piece
        if torch.compiler.is_compiling():
            out = self._unrolled_network(theta, inputs, cached, first, along_rows, along_cols)
        else:
            out = self._network_by_pieces(inputs, pieces, cached, first, along_rows, along_cols, later, workspace)

        # 4. output normalisation per slab (and Newton–Schulz)
        eps = self.normalization_eps
        square = workspace.buffer("out_square", tuple(out.shape), out) \
            if workspace is not None and workspace.fits(out.numel()) else None
        out_scale = torch.rsqrt(eps + _slab_dot(out, None, square) / slab_size).unsqueeze(-1)  # (L, 1)
        shape = inputs.shape
        if self.orthogonalize and len(shape) >= 2:
            direction = newton_schulz(inputs.unflatten(out), tuple(self.ns_coeffs), int(self.ns_iters), self.ns_eps,
                                      scale=out_scale.view(inputs.stack, *shape[:-2], 1, 1),
                                      symmetric_product=None if workspace is None else workspace.symmetric_product,
                                      overwrite=inputs.in_place)
            per_tensor = tuple(range(1, direction.dim()))
            factor = torch.rsqrt(torch.mean(torch.square(direction), dim=per_tensor, keepdim=True) + eps)
            return direction.mul_(factor) if deploy else direction * factor
        return inputs.unflatten(out.mul_(out_scale) if deploy else out * out_scale)

    def _network_by_pieces(self, inputs: _Inputs, pieces: list[tuple[int, int, int, int]], cached: Tensor | None,
                           first: Tensor, along_rows: Tensor | None, along_cols: Tensor, later: list[Tensor],
                           workspace: Workspace | None) -> Tensor:
        """Step 3 of :meth:`_network`, eagerly: ``(L, R·C)`` outputs of the network, piece by piece."""
        deploy = workspace is not None
        num_slabs, rows, cols = inputs.num_slabs, inputs.rows, inputs.cols
        slab_size = rows * cols
        count = inputs.num_elementwise
        # 3. the network, piece by piece. In deployment the features and hidden activations of
        # every piece go into scratch buffers kept across calls (fresh multi-MB tensors per piece
        # and tensor cost page faults), and the direction straight into the output.
        largest = max(inputs.piece_numel(piece) for piece in pieces)
        scratch = cached is None and workspace is not None and workspace.fits(largest * count)
        out = inputs.p.new_empty((num_slabs, slab_size)) if deploy else None
        outputs, all_written = [], out is not None

        def hidden_buffer(layer: int, shape: tuple[int, int]) -> Tensor:  # hidden0 holds the first layer's
            assert workspace is not None
            return workspace.buffer(f"hidden{(layer + 1) % 2}", shape, inputs.p)

        for piece in pieces:
            slab_start, slab_stop, row_start, row_stop = piece
            piece_slabs, piece_rows = slab_stop - slab_start, row_stop - row_start
            numel = inputs.piece_numel(piece)
            if cached is not None:
                x = cached
            else:
                x = inputs.features(piece, workspace.buffer("features", (count, numel), inputs.p) if scratch else None)
            by_piece_rows = None if along_rows is None else along_rows[slab_start:slab_stop, :, row_start:row_stop, None]
            by_cols = (along_cols if along_cols.shape[0] == 1 else along_cols[slab_start:slab_stop]).unsqueeze(-2)
            slab_features = x.view(count, piece_slabs, -1).transpose(0, 1)
            if deploy:
                # the broadcast contributions first, the product added by the gemm: one pass over h
                # instead of two (the same sums, added in another order)
                h = (workspace.buffer("hidden0", (first.shape[1], numel), inputs.p) if scratch
                     else inputs.p.new_empty((first.shape[1], numel))).view(piece_slabs, -1, piece_rows, cols)
                if by_piece_rows is None:
                    h.copy_(by_cols.expand_as(h))
                else:
                    torch.add(by_piece_rows, by_cols, out=h)
                if piece_slabs == 1:
                    h = h.view(-1, numel).addmm_(first[slab_start], x)
                else:
                    h = h.view(piece_slabs, -1, piece_rows * cols).baddbmm_(first[slab_start:slab_stop], slab_features)
            else:
                h = torch.mm(first[slab_start], x) if piece_slabs == 1 else torch.bmm(first[slab_start:slab_stop],
                                                                                         slab_features)
                h = h.view(piece_slabs, -1, piece_rows, cols)
                if by_piece_rows is not None:
                    h = h + by_piece_rows
                h = h + by_cols
                h = h.view(-1, numel) if piece_slabs == 1 else h.view(piece_slabs, -1, piece_rows * cols)
            # the later layers; in deployment a one-output direction straight into the output
            written = out is not None and piece_slabs == 1 and later[-1].shape[0] == 1
            start = slab_start * slab_size + row_start * cols
            h = folded_layers(h, later, "relu", in_place=deploy,
                              out=out.view(1, -1)[:, start:start + piece_rows * cols] if written else None,
                              scratch=hidden_buffer if scratch and piece_slabs == 1 else None)
            direction = h[..., 0, :] if h.shape[-2] == 1 else h[..., 0, :] * torch.exp(h[..., 1, :] * self.exp_mult)
            if scratch and not written:
                direction = direction.clone()  # do not keep a view of a scratch buffer
            outputs.append(direction.reshape(-1))
            all_written = all_written and written
        if not all_written:
            out = _cat(outputs, 0).view(num_slabs, slab_size)
        return out

    def _unrolled_network(self, theta: Theta, inputs: _Inputs, cached: Tensor | None, first: Tensor,
                          along_rows: Tensor | None, along_cols: Tensor) -> Tensor:
        """Step 3 of :meth:`_network` inside ``torch.compile``: the network over the whole tensor written out unit
        by unit (:func:`~lopt_hf.rules.features.unrolled_mlp`), every feature, unit and broadcast contribution a
        value of one element, so Inductor fuses features, network and readout into one loop and stores only the
        output. ``(L, R·C)``; the same network as the pieces' products, its sums in another order. ``cached``: the
        features step 1 built for their mean squares (tensors without closed-form sums), else None."""
        num_slabs, rows, cols = inputs.num_slabs, inputs.rows, inputs.cols
        rows_of_features = list(cached) if cached is not None else inputs.feature_rows((0, num_slabs, 0, rows))
        features = [x.view(num_slabs, rows, cols) for x in rows_of_features]
        hidden = []
        for unit in range(first.shape[1] - 1):  # (the last unit is the carry of the next layer's bias)
            total = along_cols[:, unit, None, :]
            if along_rows is not None:
                total = total + along_rows[:, unit, :, None]
            for index, x in enumerate(features):
                total = total + x * first[:, unit, index, None, None]
            hidden.append(torch.relu(total))
        sizes = self.layer_sizes()
        outputs = 1 if self.exp_mult == 0.0 else 2
        layers = [(theta[f"w{layer}"], theta[f"b{layer}"]) for layer in range(1, len(sizes))]
        layers[-1] = (layers[-1][0][:, :outputs], layers[-1][1][:outputs])
        h = unrolled_mlp(hidden, layers, "relu")
        direction = h[0] if outputs == 1 else h[0] * torch.exp(h[1] * self.exp_mult)
        return direction.reshape(num_slabs, rows * cols)

    def network_weights(self, theta: Theta, order: tuple[int, ...]) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Theta as the network uses it: ``w0`` rows in feature ``order`` plus a zero carry column
        ``(F, hidden + 1)``, ``[b0, 1]``, and the later layers as the shared engine's
        :func:`~lopt_hf.rules.features.bias_folded_weights` (feature-major ``[Wᵀ | b]``, hidden ones with a
        carry row ``[0 … 0 1]``; the last cut to the outputs used).

        The same every step for a given theta: a deployment kernel computes it once per ``order``.
        """
        w0 = torch.cat([theta[f"w0__{group}"] for group in range(max(order) + 1)])
        sizes = self.group_sizes()
        offsets = [sum(sizes[:group]) for group in range(len(sizes) + 1)]
        w0 = torch.cat([w0[offsets[group]:offsets[group + 1]] for group in order])
        w0 = torch.cat([w0, torch.zeros_like(w0[:, :1])], 1)
        bias = torch.cat([theta["b0"], torch.ones_like(theta["b0"][:1])])
        layer_sizes = self.layer_sizes()
        later = [matrix.contiguous() for matrix in bias_folded_weights(
            [(theta[f"w{layer}"], theta[f"b{layer}"]) for layer in range(1, len(layer_sizes))], torch.relu)]
        later[-1] = later[-1][:1 if self.exp_mult == 0.0 else 2]
        return w0, bias, later


def _decay_tensors(decays: tuple[float, ...], rank: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(decay, 1 − decay)`` as ``(k, 1, …, 1)`` float32 tensors against ``(k, *shape)`` of ``rank`` dims
    (made once per setting eagerly; inside ``torch.compile`` constants of the graph)."""
    if torch.compiler.is_compiling():
        return _new_decay_tensors(decays, rank, device)
    return _cached_decay_tensors(decays, rank, device)


def _new_decay_tensors(decays: tuple[float, ...], rank: int, device: torch.device) -> tuple[Tensor, Tensor]:
    decay = torch.tensor(decays, dtype=torch.float32, device=device).reshape(-1, *([1] * rank))
    return decay, 1.0 - decay


_cached_decay_tensors = functools.lru_cache(maxsize=64)(_new_decay_tensors)


def _column_major(x: Tensor) -> bool:
    """A matrix (or batch of them) whose last two axes lie transposed in memory."""
    return x.dim() >= 2 and x.shape[-1] > 1 and x.shape[-2] > 1 and not x.is_contiguous() and x.mT.is_contiguous()


def _clip(x: Tensor, out: Tensor | None = None) -> Tensor:
    return torch.clamp(x, -0.1, 0.1, out=out)


def _cat(tensors: list[Tensor], dim: int) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _slab_dot(x: Tensor, y: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``Σ x·y`` over the last axis (``y`` broadcasts; None: ``y = x``); ``out``: a buffer for the product.

    A product and a pairwise sum: slower than a gemv or a norm, but those are off by up to ~1e-5
    on long float32 vectors, and the mean squares must be as exact as the original's (a feature
    with one huge element turns a relative error ε of its scale into ~ε·√N in the output).
    """
    return torch.sum(torch.square(x, out=out) if y is None else torch.mul(x, y, out=out), dim=-1)


class _Inputs:
    """One tensor's accumulators, flattened to ``(k, N)``, seen as L slabs of R × C.

    Slabs are the indices of the leading axes (all but the last two) — Celo2 normalises over the
    last two; a 1-D tensor is one slab ``(n, 1)``. Pieces are contiguous element ranges: whole
    slabs, or row ranges of one slab. The feature order (``order``, theta groups): element-wise
    groups, then the broadcast groups varying along R, then those varying along C.

    "Standard" tensors (every matrix; conv kernels whose channel axes are the two largest) have
    their row/col statistics constant along one of the last two axes: they stay vectors
    (``vectors``: ``(6, L, R)``, ``(6, L, C)``) and :meth:`piece_sums` has the sums in closed form.
    Otherwise (tensors with < 2 dims, other conv kernels) every group is element-wise.
    """

    def __init__(self, shape: tuple[int, ...], stack: int, g: Tensor | None, g2: Tensor | None, p: Tensor, m: Tensor,
                 rms: Tensor, rsqrt_rms: Tensor | None, factors: tuple, column_major: bool = False,
                 workspace: Workspace | None = None, lazy: tuple[Tensor, float] | None = None) -> None:
        ndim = len(shape)
        self.shape = shape  # of one tensor of the stack
        self.stack = stack
        self.workspace = workspace  # deployment: temporaries may go into its reused buffers
        self.column_major = column_major  # a matrix stored transposed: R and C swap roles below
        if ndim >= 2:
            self.num_slabs, self.rows, self.cols = stack * math.prod(shape[:-2]), shape[-2], shape[-1]
            if column_major:
                self.rows, self.cols = self.cols, self.rows
        else:
            self.num_slabs, self.rows, self.cols = stack, shape[0], 1
        numel = self.num_slabs * self.rows * self.cols

        def flat(x: Tensor, lead: int) -> Tensor:  # (lead, N) in memory order
            return (x.mT if column_major else x).reshape(lead, numel)

        self.p, self.m, self.rms = flat(p, 1), flat(m, m.shape[0]), flat(rms, rms.shape[0])
        # lazy = (gradient, grad_clip): g, g² and rsqrt(rms) are built per piece (see Workspace.in_place)
        self.grad, self.grad_clip = (None, 0.0) if lazy is None else (flat(lazy[0], 1), lazy[1])
        self.g, self.g2 = (None, None) if lazy is not None else (flat(g, 1), flat(g2, 1))
        self.rsqrt_rms = None if lazy is not None else flat(rsqrt_rms, rms.shape[0])
        self.standard = len(factors) == 6 and {factors[2], factors[5]} == {ndim - 2, ndim - 1}
        self.vectors: tuple[Tensor, Tensor] | None = None
        self.materialized: list[Tensor] = []
        if len(factors) == 1:  # < 2 dims: v_diag
            self.fac = factors[0].view(-1, numel)
            self.order = tuple(range(NUM_GROUPS_1D))
        elif self.standard:
            v_row, row_factor, d0, v_col, col_factor, d1 = factors
            # a vector constant along the last axis (C) varies along R; in memory order R and C swap
            row_is_r = (d0 == ndim - 1) != column_major
            by_r, by_c = ((v_row, row_factor), (v_col, col_factor)) if row_is_r else ((v_col, col_factor), (v_row, row_factor))
            self.fac_rows = by_r[1].reshape(-1, self.num_slabs, self.rows)
            self.fac_cols = by_c[1].reshape(-1, self.num_slabs, self.cols)
            self.vectors = (torch.cat([by_r[0], torch.rsqrt(by_r[0] + 1e-8)]).reshape(-1, self.num_slabs, self.rows),
                            torch.cat([by_c[0], torch.rsqrt(by_c[0] + 1e-8)]).reshape(-1, self.num_slabs, self.cols))
            # row, col, rsqrt_row, rsqrt_col are groups 9, 10, 11, 12
            r_groups, c_groups = ((9, 11), (10, 12)) if row_is_r else ((10, 12), (9, 11))
            self.order = (*range(NUM_GROUPS_1D), len(FEATURE_GROUPS) - 1, *r_groups, *c_groups)
        else:
            v_row, row_factor, d0, v_col, col_factor, d1 = factors

            def full(x: Tensor, constant_axis: int) -> Tensor:  # (k, B, …) → (k, B, *shape)
                return x.unsqueeze(2 + constant_axis).expand(x.shape[0], stack, *shape)

            self.fac = (full(row_factor, d0) * full(col_factor, d1)).view(-1, numel)
            self.materialized = [full(x, axis).reshape(-1, numel) for x, axis in
                                 ((v_row, d0), (v_col, d1), (torch.rsqrt(v_row + 1e-8), d0), (torch.rsqrt(v_col + 1e-8), d1))]
            self.order = tuple(range(len(FEATURE_GROUPS)))
        # rows of features(): g, clip, p, m, rms, m·rsqrt, rsqrt, fac_g, g·rsqrt [, materialized, fac_mom]
        moms, facs = self.m.shape[0], (self.fac_rows if self.standard else self.fac).shape[0]
        self.num_elementwise = 6 + 2 * moms + facs
        if len(factors) == 6:
            self.num_elementwise += sum(x.shape[0] for x in self.materialized) + max(moms, facs)

    @property
    def in_place(self) -> bool:
        """Whether this update runs in place (g, g², rsqrt(rms) per piece; see ``Workspace.in_place``)."""
        return self.grad is not None

    def g_at(self, at: tuple) -> Tensor:
        """The clipped gradient of a piece (``at`` indexes the flat ``(lead, N)`` tensors)."""
        return self.g[at] if self.g is not None else torch.clamp(self.grad[at], -self.grad_clip, self.grad_clip)

    def g2_at(self, at: tuple) -> Tensor:
        if self.g2 is not None:
            return self.g2[at]
        g = self.g_at(at)
        return torch.mul(g, g)

    def rsqrt_rms_at(self, at: tuple) -> Tensor:
        return self.rsqrt_rms[at] if self.rsqrt_rms is not None else torch.add(self.rms[at], 1e-8).rsqrt_()

    def unflatten(self, out: Tensor) -> Tensor:
        """``(L, R·C)`` in memory order → ``(B, *shape)`` (a transposed view if column-major)."""
        if self.column_major:
            return out.view(self.stack, *self.shape[:-2], self.shape[-1], self.shape[-2]).mT
        return out.view(self.stack, *self.shape)

    def pieces(self, chunk_size: int | None) -> list[tuple[int, int, int, int]]:
        """``(slab_start, slab_stop, row_start, row_stop)``: all at once, groups of whole slabs, or row ranges
        (:func:`~lopt_hf.rules.features.chunk_indices` of the (L, R, C) slabs, C never split)."""
        pieces = []
        for index in chunk_indices((self.num_slabs, self.rows, self.cols), chunk_size, whole_trailing_axes=1):
            if not index:
                pieces.append((0, self.num_slabs, 0, self.rows))
            elif len(index) == 1:
                pieces.append((index[0].start, index[0].stop, 0, self.rows))
            else:
                pieces.append((index[0], index[0] + 1, index[1].start, index[1].stop))
        return pieces

    def piece_numel(self, piece: tuple[int, int, int, int]) -> int:
        return (piece[1] - piece[0]) * (piece[3] - piece[2]) * self.cols

    def feature_specs(self, piece: tuple[int, int, int, int]) -> list[tuple]:
        """How the element-wise features of a piece are computed, in ``order``: ``(function or None for "as is",
        operands)``, each giving ``(k, n)`` rows (``k`` decays)."""
        slab_start, slab_stop, row_start, row_stop = piece
        first = slab_start * self.rows * self.cols + row_start * self.cols
        at = (slice(None), slice(first, first + self.piece_numel(piece)))
        g, m, rsqrt_rms = self.g_at(at), self.m[at], self.rsqrt_rms_at(at)
        if self.standard:
            fac = self.fac_rows[:, slab_start:slab_stop, row_start:row_stop, None] * \
                self.fac_cols[:, slab_start:slab_stop, None, :]
            fac = fac.view(fac.shape[0], -1)
        else:
            fac = self.fac[at]
        specs: list[tuple] = [(None, g), (_clip, g), (None, self.p[at]), (None, m), (None, self.rms[at]),
                              (torch.mul, m, rsqrt_rms), (None, rsqrt_rms), (torch.mul, g, fac),
                              (torch.mul, g, rsqrt_rms)]
        if len(self.order) > NUM_GROUPS_1D:
            specs += [(None, x[at]) for x in self.materialized]
            specs.append((torch.mul, m, fac))
        return specs

    def features(self, piece: tuple[int, int, int, int], out: Tensor | None = None) -> Tensor:
        """The element-wise features of a piece, ``(E, n)`` in ``order``.

        With ``out`` (deployment: no autograd, no vmap) each feature is written straight into it
        instead of into a temporary that a concatenation then copies.
        """
        specs = self.feature_specs(piece)
        if out is None:
            return torch.cat([args[0] if fn is None else fn(*args) for fn, *args in specs])
        row = 0
        for fn, *args in specs:
            size = max(arg.shape[0] for arg in args)
            if fn is None:
                out[row:row + size].copy_(args[0])
            else:
                fn(*args, out=out[row:row + size])
            row += size
        return out

    def feature_rows(self, piece: tuple[int, int, int, int]) -> list[Tensor]:
        """The element-wise features of a piece as ``E`` tensors of ``n`` (what an unrolled network reads)."""
        return [row for fn, *args in self.feature_specs(piece) for row in (args[0] if fn is None else fn(*args))]

    def piece_sums(self, piece: tuple[int, int, int, int]) -> Tensor:
        """Closed-form sums of squares of a piece's element-wise features per slab (standard tensors).

        ``(E, slabs in the piece)``, without building the features: ``Σ (x·y)² = Σ x²·y²``, and
        for the factored ones ``Σ_rc x_rc·a_r²·b_c² = Σ_r a_r²·(x @ b²)_r`` (a matrix product).
        """
        slab_start, slab_stop, row_start, row_stop = piece
        slabs = slab_stop - slab_start
        first = slab_start * self.rows * self.cols + row_start * self.cols
        at = (slice(None), slice(first, first + self.piece_numel(piece)))

        def per_slab(x: Tensor) -> Tensor:  # (k, n) → (k, slabs, n / slabs)
            return x.view(x.shape[0], slabs, -1)

        def temp(name: str, rows: int) -> Tensor | None:  # deployment: a reused (rows, slabs, n / slabs) buffer
            size = (rows, slabs, self.piece_numel(piece) // slabs)
            if self.workspace is None or not self.workspace.fits(math.prod(size)):
                return None
            return self.workspace.buffer(f"sums_{name}", size, self.p)

        g2 = per_slab(self.g2_at(at))
        rsqrt2 = torch.square(per_slab(self.rsqrt_rms_at(at)), out=temp("rsqrt2", 1))
        m2 = torch.square(per_slab(self.m[at]), out=temp("m2", self.m.shape[0]))
        rows2 = torch.square(self.fac_rows[:, slab_start:slab_stop, row_start:row_stop])  # (k, slabs, rows)
        cols2 = torch.square(self.fac_cols[:, slab_start:slab_stop])  # (k, slabs, C)

        def with_factor(x: Tensor) -> Tensor:  # Σ x·fac², per decay and slab
            matrices = x.view(x.shape[0], slabs, row_stop - row_start, self.cols)
            if x.shape[0] == 1:  # one matrix against k column vectors: (slabs, rows, C) @ (slabs, C, k)
                per_row = torch.bmm(matrices[0], cols2.permute(1, 2, 0)).permute(2, 0, 1)
            else:  # decay by decay: a product and a row sum (batched matrix × one vector is 5× slower)
                product = temp("product", x.shape[0])
                product = None if product is None else product.view(matrices.shape)
                per_row = torch.mul(matrices, cols2.unsqueeze(2), out=product).sum(-1)
            return (per_row * rows2).sum(-1)

        return torch.cat([g2.sum(-1), torch.clamp(g2, max=0.1 ** 2, out=temp("one", 1)).sum(-1),
                          _slab_dot(per_slab(self.p[at]), None, temp("one", 1)), m2.sum(-1),
                          _slab_dot(per_slab(self.rms[at]), None, temp("one", 1)),
                          _slab_dot(m2, rsqrt2, temp("product", m2.shape[0])), rsqrt2.sum(-1), with_factor(g2),
                          _slab_dot(g2, rsqrt2, temp("one", 1)), with_factor(m2)])
