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
without d1), or ``v_diag`` (3, *shape).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import State, Theta, UpdateRule, register_rule
from .features import factored_dims, truncated_normal_init

# Feature groups in the original's order, and how many numbers each contributes (with 3 momentum,
# 1 rms and 3 adafactor decays). The first NUM_GROUPS_1D are used for tensors with < 2 dims.
FEATURE_GROUPS = ("g", "clipped_g", "p", "m", "rms", "m_rsqrt_rms", "rsqrt_rms", "fac_g", "g_rsqrt_rms",
                  "row", "col", "rsqrt_row", "rsqrt_col", "fac_mom_mult")
NUM_GROUPS_1D = 9
HAIKU_PREFIX = "ff_mod_stack/~/"


def _safe_rsqrt(x: Tensor) -> Tensor:
    return torch.rsqrt(torch.clamp(x, min=1e-9))


def newton_schulz(x: Tensor, coeffs: tuple[float, float, float], iterations: int, eps: float) -> Tensor:
    """Orthogonalise the matrices over the last two axes of ``x`` (optax/Muon quintic iteration).

    ``x / (‖x‖_F + eps)``, then ``iterations`` × ``x ← a·x + (b·A + c·A²)·x`` with ``A = x·xᵀ``,
    computed on the wide orientation (tall matrices are transposed and transposed back).
    """
    a, b, c = coeffs
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)
    for _ in range(iterations):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if transposed else x


@register_rule
@dataclasses.dataclass(frozen=True)
class Celo2(UpdateRule):
    """Celo2's learned MLP update rule (``orthogonalize=True``: Celo2, ``False``: Celo2-base)."""

    name = "celo2"
    # Computes in JAX layout: LearnedOptimizer maps torch Linear/Conv weights to it and back.
    layout_sensitive = True

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
    def init_state(self, param: Tensor) -> State:
        shape = tuple(param.shape) if param.dim() > 0 else (1,)

        def zeros(count: int, of_shape: tuple[int, ...]) -> Tensor:
            return torch.zeros((count, *of_shape), dtype=torch.float32, device=param.device)

        facs = len(self.adafactor_decays)
        state = {"momentum": zeros(len(self.momentum_decays), shape), "rms": zeros(1, shape)}
        dims = factored_dims(shape)
        if dims is None:
            state["v_diag"] = zeros(facs, shape)
        else:
            d1, d0 = dims
            state["v_row"] = zeros(facs, shape[:d0] + shape[d0 + 1:])
            state["v_col"] = zeros(facs, shape[:d1] + shape[d1 + 1:])
        return state

    # ----------------------------------------------------------------------- update
    def update(self, theta: Theta, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
               chunk_size: int | None = None) -> tuple[Tensor, State]:
        original_shape = param.shape
        if param.dim() == 0:  # as the original: scalars are treated as (1,)
            param, grad = param.reshape(1), grad.reshape(1)
        shape = tuple(param.shape)
        ndim = len(shape)
        device = param.device

        def per_decay(decays: tuple[float, ...], rank: int) -> Tensor:  # (k,) → (k, 1, …, 1)
            return torch.tensor(decays, dtype=torch.float32, device=device).reshape(-1, *([1] * rank))

        # --- accumulators (the new state), decay axis first
        g = torch.clamp(grad, -self.grad_clip, self.grad_clip)
        mom_decay = per_decay(self.momentum_decays, ndim)
        rms_decay = per_decay(self.rms_decays, ndim)
        momentum = mom_decay * state["momentum"] + (1.0 - mom_decay) * g.unsqueeze(0)
        rms = rms_decay * state["rms"] + (1.0 - rms_decay) * (g * g).unsqueeze(0)
        grad_sqr = g * g + 1e-30
        new_state = {"momentum": momentum, "rms": rms}
        rsqrt_rms = torch.rsqrt(rms + 1e-8)

        full = (len(self.adafactor_decays), *shape)
        dims = factored_dims(shape)
        if dims is None:
            decay = per_decay(self.adafactor_decays, ndim)
            v_diag = decay * state["v_diag"] + (1.0 - decay) * grad_sqr.unsqueeze(0)
            new_state["v_diag"] = v_diag
            fac_g_factor: Tensor | tuple[Tensor, Tensor] = _safe_rsqrt(v_diag + 1e-9)
            factored: tuple[Tensor, ...] | None = None
        else:
            d1, d0 = dims
            decay = per_decay(self.adafactor_decays, ndim - 1)
            v_row = decay * state["v_row"] + (1.0 - decay) * torch.mean(grad_sqr, dim=d0).unsqueeze(0)
            v_col = decay * state["v_col"] + (1.0 - decay) * torch.mean(grad_sqr, dim=d1).unsqueeze(0)
            new_state["v_row"], new_state["v_col"] = v_row, v_col
            # axis d1 inside v_row (which lacks d0), shifted by the leading decay axis
            row_axis_d1 = (d1 - 1 if d1 > d0 else d1) + 1
            row_col_mean = torch.mean(v_row, dim=row_axis_d1, keepdim=True)
            row_factor = _safe_rsqrt(v_row / (row_col_mean + 1e-9))
            col_factor = _safe_rsqrt(v_col)

            # Broadcast views of (facs, *shape): nothing of full size is allocated here.
            def along_row(x: Tensor) -> Tensor:
                return x.unsqueeze(1 + d0).expand(full)

            def along_col(x: Tensor) -> Tensor:
                return x.unsqueeze(1 + d1).expand(full)

            fac_g_factor = (along_row(row_factor), along_col(col_factor))
            factored = (along_row(v_row), along_col(v_col), along_row(torch.rsqrt(v_row + 1e-8)),
                        along_col(torch.rsqrt(v_col + 1e-8)))

        def factor_at(index: tuple) -> Tensor:
            if isinstance(fac_g_factor, tuple):
                return fac_g_factor[0][index] * fac_g_factor[1][index]
            return fac_g_factor[index]

        def features(index: tuple) -> Tensor:
            """The (F, *piece) normalisable inputs of ``param[index]``."""
            at = (slice(None), *index)
            g_i, m_i, rms_i, rsqrt_i = g[index].unsqueeze(0), momentum[at], rms[at], rsqrt_rms[at]
            fac_i = factor_at(at)
            inputs = [g_i, torch.clamp(g_i, -0.1, 0.1), param[index].unsqueeze(0), m_i, rms_i, m_i * rsqrt_i,
                      rsqrt_i, g_i * fac_i, g_i * rsqrt_i]
            if factored is not None:
                inputs += [tensor[at] for tensor in factored]
                inputs.append(m_i * fac_i)
            return torch.cat(inputs)

        direction = self._network(theta, features, shape, chunk_size)
        if self.orthogonalize and ndim >= 2:
            direction = newton_schulz(direction, tuple(self.ns_coeffs), int(self.ns_iters), self.ns_eps)
            direction = direction * torch.rsqrt(torch.mean(torch.square(direction)) + self.normalization_eps)
        if self.rmsmult != 1.0:
            direction = direction * self.rmsmult
        return direction.reshape(original_shape), new_state

    # ----------------------------------------------------------------------- network
    def _first_layer(self, theta: Theta, num_features: int) -> Tensor:
        """The per-group first-layer matrices stacked into one (F, hidden) matrix.

        ``F`` tells which groups are present: all 14, or the first 9 for tensors with < 2 dims.
        """
        sizes = self.group_sizes()
        groups = NUM_GROUPS_1D if num_features == sum(sizes[:NUM_GROUPS_1D]) else len(sizes)
        return torch.cat([theta[f"w0__{i}"] for i in range(groups)])

    def _readout(self, out: Tensor) -> Tensor:
        if self.exp_mult == 0.0:
            return out[..., 0]
        return out[..., 0] * torch.exp(out[..., 1] * self.exp_mult)

    def _hidden(self, theta: Theta, h: Tensor) -> Tensor:
        # Deployment runs without autograd: then the activations may be rectified in place.
        relu = torch.relu_ if not torch.is_grad_enabled() else torch.relu
        for layer in range(1, len(self.layer_sizes())):
            h = torch.matmul(relu(h), theta[f"w{layer}"]) + theta[f"b{layer}"]
        return h

    def _network(self, theta: Theta, features: Callable[[tuple], Tensor], shape: tuple[int, ...],
                 chunk_size: int | None) -> Tensor:
        """Normalised features → MLP → normalised direction, a tensor of ``shape``.

        Normalisation statistics are per index of the leading axes (all but the last two). The
        input normalisation is folded into the first layer: ``(x·s) @ W == x @ (s[:, None]·W)``.
        With ``chunk_size`` the features are built per piece (twice: mean squares, then the
        network) and never for a whole large slab; without it, once for the whole tensor.
        """
        eps = self.normalization_eps
        lead_shape = shape[:-2]
        slab = math.prod(shape[-2:])
        numel = math.prod(shape)
        b0 = theta["b0"]
        if chunk_size is None or numel <= chunk_size:
            x = features(())
            num_features = x.shape[0]
            x = x.reshape(num_features, -1, slab)  # (F, L, slab)
            scale = torch.rsqrt(eps + torch.mean(torch.square(x), dim=-1))  # (F, L)
            w0 = self._first_layer(theta, num_features)
            weight = scale.t().unsqueeze(-1) * w0  # (L, F, hidden)
            h = torch.matmul(x.permute(1, 2, 0), weight) + b0  # (L, slab, hidden)
            out = self._readout(self._hidden(theta, h))  # (L, slab)
            out = out * torch.rsqrt(eps + torch.mean(torch.square(out), dim=-1, keepdim=True))
            return out.reshape(shape)

        # Chunked: pieces are row ranges of one leading index's slab (of the whole vector for 1-D).
        columns = shape[-1]
        rows = shape[-2] if len(shape) >= 2 else 1
        rows_per_piece = max(1, int(chunk_size) // columns)
        slabs = []
        for lead in itertools.product(*(range(size) for size in lead_shape)):
            if len(shape) >= 2:
                pieces = [lead + (slice(start, min(start + rows_per_piece, rows)),)
                          for start in range(0, rows, rows_per_piece)]
            else:
                pieces = [(slice(start, min(start + int(chunk_size), columns)),)
                          for start in range(0, columns, int(chunk_size))]
            if len(pieces) == 1:
                cached = [features(pieces[0])]
                sum_square = torch.sum(torch.square(cached[0].reshape(cached[0].shape[0], -1)), dim=1)
            else:
                cached = []
                sum_square = None
                for index in pieces:
                    x = features(index)
                    part = torch.sum(torch.square(x.reshape(x.shape[0], -1)), dim=1)
                    sum_square = part if sum_square is None else sum_square + part
            num_features = sum_square.shape[0]
            weight = self._first_layer(theta, num_features) * torch.rsqrt(eps + sum_square / slab).unsqueeze(-1)
            outputs = []
            for position, index in enumerate(pieces):
                x = cached[position] if cached else features(index)
                h = torch.addmm(b0, x.reshape(num_features, -1).t(), weight)
                outputs.append(self._readout(self._hidden(theta, h)))
            out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            slabs.append(out * torch.rsqrt(eps + torch.mean(torch.square(out))))
        return torch.stack(slabs).reshape(shape)
