"""In-place deployment kernels of the scheduled rules ``celo`` (and ``velo``, a Celo) and ``celo_adam``.

Their per-element part is like ``small_fc_lopt``'s (:mod:`lopt_hf.kernels.in_place`): the rules build
new full-size accumulators (momentum ×3 and rms for Celo, Adam's two moments for Celo-Adam) while the
old ones are alive, plus several full-size temporaries. These kernels run the rules' own functions
piece by piece instead — the same float operations, so the same bits: the accumulators of each piece
are advanced in place (Celo: right before the piece's features are first built, through
``normalized_mlp``'s hooks, its features and activations in the kernel's reused buffers), the step is
written into one preallocated buffer and scaled in place. Celo's and VeLO's kernel does so for every
tensor (on the benchmark MLP, ``lopt-hf bench``: peak extra memory 78–80 → 40–48 MB, the step as fast);
Celo-Adam's from :data:`~lopt_hf.kernels.in_place.IN_PLACE_MIN_NUMEL` elements on (smaller tensors take the
rule's own update: its 1M-element pieces measured 1.6× slower there, 30–37 against 19–24 ms).

The scheduler's per-step control row of each tensor arrives as the ``control`` keyword.
"""

from __future__ import annotations

from torch import Tensor

from ..rules.base import State, as_step_tensor
from ..rules.celo import Celo, CeloAdam, orthogonalized, param_rms
from ..rules.features import chunk_indices
from .base import register_kernel
from .in_place import APPLY_CHUNK, InPlaceKernel, writable


@register_kernel(Celo)
class CeloKernel(InPlaceKernel):
    """``celo`` / ``velo``: momentum and rms advanced in place piece by piece, the step written in place;
    the clipped gradient (one full-size copy) and the small factored moments computed whole, as the rule does."""

    rule: Celo
    every_size = True

    def update_into(self, out: Tensor, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
                    chunk_size: int | None, *, control: Tensor) -> State:
        p = param.reshape(1) if param.dim() == 0 else param
        momentum, rms = writable(state["momentum"]), writable(state["rms"])
        g = self.rule.clipped(grad.reshape(p.shape))
        accumulators, fac = self.rule.factored_moments(g, state)

        def advance(index: tuple) -> None:
            at = (slice(None), *index)
            new_momentum, new_rms = self.rule.advance_moments(momentum[at], rms[at], g[index])
            momentum[at].copy_(new_momentum)
            rms[at].copy_(new_rms)

        self.rule.network_step(self.theta, p, g, momentum, rms, fac, control, chunk_size or APPLY_CHUNK,
                               hooks=self.hooks(out, advance))
        out.mul_(self.rule.step_scale(p, control))
        return {"momentum": momentum, "rms": rms, **accumulators}


@register_kernel(CeloAdam)
class CeloAdamKernel(InPlaceKernel):
    """``celo_adam``: Adam's moments advanced in place and the step written, piece by piece of the flat tensor."""

    rule: CeloAdam

    @property
    def fused_subtract(self) -> bool:
        return False  # deployed one tensor at a time before it stacked: lr·step rounded first

    def update_into(self, out: Tensor, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
                    chunk_size: int | None, *, control: Tensor) -> State:
        rule = self.rule
        momentum, rms = writable(state["momentum"]), writable(state["rms"])
        count = as_step_tensor(step, param) + 1.0
        flat_m, flat_rms, flat_g, flat_out = momentum.view(1, -1), rms.view(1, -1), grad.reshape(-1), out.view(-1)
        for rows in chunk_indices(flat_g.shape, chunk_size or APPLY_CHUNK):
            at = (slice(None), *rows)
            g = rule.clipped(flat_g[rows])
            new_momentum, new_rms = rule.advance_moments(flat_m[at], flat_rms[at], g)
            flat_m[at].copy_(new_momentum)
            flat_rms[at].copy_(new_rms)
            flat_out[rows].copy_(rule.adam_direction(new_momentum[0], new_rms[0], count, control))
        if rule.orthogonalize and param.dim() >= 2:  # Newton–Schulz needs the whole matrix: after the pieces
            out.copy_(orthogonalized(out))
        if rule.param_scale_mult:
            out.mul_(param_rms(param))
        return {"momentum": momentum, "rms": rms}
