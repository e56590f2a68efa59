"""Deployment kernels of the per-element rules that advance the state in place, piece by piece.

``small_fc_lopt``, ``mlp_lopt`` and ``per_param_mlp`` are pure functions: each step builds its new
accumulators (several copies of the parameter's size) while the old ones are alive, then the
features and the step. For a large tensor that costs several times AdamW's memory (50M elements:
2.8 GB for small_fc_lopt, 5.5 GB for mlp_lopt, against 0.8 GB). These kernels run the rules' own
functions (the same float operations, so the same bits) on pieces of the tensor
(:func:`lopt_hf.rules.features.chunk_indices`, ``chunk_size`` elements):

* each piece's full-size accumulators (momenta, rms) are advanced in place, once, right before the
  piece's features are first built (``normalized_mlp``'s ``advance`` hook); only a piece's
  temporaries are ever allocated — the factored ``v_row`` / ``v_col`` are small and new;
* a piece's feature matrix and hidden activations go into the kernel's :class:`~lopt_hf.kernels.buffers.Buffers`,
  the same memory for every piece and step (``StreamHooks.buffer``);
* the step is written into one preallocated buffer (no list of pieces to concatenate);
* :meth:`InPlaceKernel.apply_step` subtracts ``lr·step`` piece by piece (the same rounding as
  :meth:`RuleKernel.apply_step` of a per-tensor rule, without a full-size ``lr·step``);
* a parameter and gradient handed in as views in another memory order (a layout-sensitive rule's
  ``nn.Linear`` weight) are copied to contiguous memory first below 4M elements, as every kernel does
  (:func:`~lopt_hf.kernels.base.contiguous_below`).

``small_fc_lopt``, ``mlp_lopt`` and ``per_param_mlp`` — and Celo and VeLO (:mod:`lopt_hf.kernels.celo`) —
take this path for every tensor (:attr:`InPlaceKernel.every_size`): on the benchmark MLP (``lopt-hf bench``)
it measured as fast as the rule's own update with about half the peak extra memory. Celo-Adam's kernel takes
it from :data:`IN_PLACE_MIN_NUMEL` elements (4M) on; smaller tensors take the rule's own update. Under
``compile=True``, tensors below 4M take the compiled graph instead. The returned new state is the state
handed in (its full-size tensors advanced), except that a full-size entry that is not contiguous is
replaced by a contiguous copy first. So a kernel call advances the state even if the optimizer then
does not commit the step (an update whose ``lr·step`` is not finite); the rule's own ``update`` leaves
its input untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..rules.base import State, Theta, UpdateRule
from ..rules.features import (CONTRACTED_SKINNY_COMPILE_OPTIONS, ElementMajorWeights, FactoredFeatures, StreamHooks,
                              bias_folded_mlp, chunk_indices, ema, feature_mean_squares, piece_network)
from ..rules.mlp_lopt import MLPLOpt, advance_momentum
from ..rules.per_param_mlp import PerParamMLP, feature_matrix
from ..rules.small_fc_lopt import SmallFCLOpt, advance_moments
from .base import RuleKernel, contiguous_below, register_kernel
from .inductor_graphs import InductorGraphs
from .buffers import Buffers

if TYPE_CHECKING:
    from .compiled import Compiler

# Elements per piece of the scheduled rules' in-place pieces when no chunk size is given (4 MB of float32).
APPLY_CHUNK = 1 << 20
# Elements per piece of the parameter update: its one temporary, ``lr·step`` of a piece, stays at 256 KB.
SUBTRACT_CHUNK = 1 << 16
# Kernels that are not in place for every size (``every_size``) hand tensors below this size to the rule's
# own (functional) update; both paths give the same bits.
IN_PLACE_MIN_NUMEL = 1 << 22


class InPlaceKernel(RuleKernel):
    """A per-tensor rule whose kernel advances the state in place and writes the step into a buffer.

    Subclasses implement :meth:`update_into` for one tensor. ``buffers``: the pieces' features and
    activations, reused from piece to piece and step to step (:mod:`lopt_hf.kernels.buffers`).
    """

    def __init__(self, rule: UpdateRule, theta: Theta) -> None:
        super().__init__(rule, theta)
        self.buffers = Buffers()

    def hooks(self, out: Tensor, advance: Callable[[tuple], None] | None,
              mean_square: Tensor | None = None) -> StreamHooks:
        """What :func:`~lopt_hf.rules.features.normalized_mlp` gets from this kernel for a tensor whose step
        goes into ``out`` (``advance`` or the features' ``mean_square``, :class:`~lopt_hf.rules.features.StreamHooks`;
        under compile=True its compiled pieces)."""
        return StreamHooks(advance=advance, out=out.view(-1), buffer=self.buffers.lender(out), mean_square=mean_square,
                           compiled_pieces=self._compiled_pieces)

    # Under compile=True (:meth:`compile_parts`, kernels with a :meth:`first_pass`): the first pass through
    # torch.compile, for tensors below IN_PLACE_MIN_NUMEL (larger ones keep the streamed pass, whose memory near
    # AdamW's is measured; the compiled one is measured below).
    _compiled_first_pass: Callable[..., Tensor] | None = None
    # Under compile=True (:meth:`compile_parts`): each piece's features and network compiled (StreamHooks).
    _compiled_pieces: CompiledPieces | None = None
    # Whether the first pass pays for compiling (kernels that define :meth:`first_pass`).
    compiles_first_pass = False

    def compile_parts(self, compiler: Compiler) -> None:
        """Under compile=True (kernels that set :attr:`compiled_parts`: mlp_lopt, small_fc_lopt), the network of
        every piece runs compiled (:class:`CompiledPieces`): its features and first layer fuse into one loop that
        builds no feature matrix, the hidden layer stays a BLAS product, the output layer and readout fuse into one
        more loop — for a rule whose first layer is skinny (mlp_lopt; see ``features.normalized_mlp``). And where
        :attr:`compiles_first_pass`, :meth:`first_pass` — the features built and reduced piece by piece, dozens of
        passes over memory eagerly — fuses into one (small_fc_lopt on the bench MLP: that pass alone 8 ms compiled
        against 85 ms for the same code eagerly; mlp_lopt's, its features views of the gradient, value and momenta,
        measured no faster compiled on its own, and 48–51 against 55–57 ms per step with its compiled pieces)."""
        super().compile_parts(compiler)
        self._compiled_pieces = CompiledPieces(compiler)
        if self.compiles_first_pass:
            self._compiled_first_pass = compiler.compile(self.first_pass_if_compiled)

    def first_pass(self, *args: Any) -> Tensor:
        """The streamed network's first pass over the whole tensor at once: the state advanced in place, the
        features' mean squares returned (:func:`~lopt_hf.rules.features.feature_mean_squares`). Compiled,
        nothing of the features is materialised; eagerly it would build them all."""
        raise NotImplementedError

    def first_pass_if_compiled(self, *args: Any) -> Tensor | None:
        """:meth:`first_pass` while torch.compile traces it; None (nothing done) when it runs eagerly — compiling
        failed, or dynamo runs a shape beyond its recompile limit eagerly —, so the caller takes the streamed
        pass, whose memory stays a piece's, instead of building every feature of the tensor at once."""
        return self.first_pass(*args) if torch.compiler.is_compiling() else None

    def stream_hooks(self, out: Tensor, advance: Callable[[tuple], None], *first_pass_args: Any) -> StreamHooks:
        """:meth:`hooks` for one tensor: its compiled :meth:`first_pass` (``first_pass_args``) has advanced the
        state and gives the mean squares, or (eagerly, a large tensor, or a first pass that did not run
        compiled) ``advance`` is called piece by piece."""
        if self._compiled_first_pass is not None and out.numel() < IN_PLACE_MIN_NUMEL:
            mean_square = self._compiled_first_pass(*first_pass_args)
            if mean_square is not None:
                return self.hooks(out, None, mean_square)
        return self.hooks(out, advance)

    def update_into(self, out: Tensor, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
                    chunk_size: int | None, **kwargs: Any) -> State:
        """Write the step of one tensor into ``out`` (``param``'s shape, contiguous) and return its new state.

        ``kwargs``: the rule's keywords for this tensor (a scheduled rule's ``control`` row)."""
        raise NotImplementedError

    def update_stack(self, params: Tensor, grads: Tensor, states: list[State], step: Tensor | int,
                     chunk_size: int | None = None, **kwargs: Any) -> tuple[Tensor, list[State]]:
        if set(kwargs) - self.per_tensor_keywords:
            raise TypeError(f"rule {self.rule.name!r} takes no keywords {sorted(set(kwargs) - self.per_tensor_keywords)}")
        if not self.in_place(params[0].numel()):
            return super().update_stack(params, grads, states, step, chunk_size, **kwargs)
        params, grads = contiguous_below(params), contiguous_below(grads)
        direction = torch.empty(params.shape, dtype=torch.float32, device=params.device)
        with torch.no_grad():
            new_states = [self.update_into(direction[index], params[index], grads[index], state, step, chunk_size,
                                           **{key: value[index] for key, value in kwargs.items()})
                          for index, state in enumerate(states)]
        return direction, new_states

    # Whether every tensor goes piece by piece, in place (else from IN_PLACE_MIN_NUMEL elements on).
    every_size = False

    def in_place(self, numel: int) -> bool:
        """Every tensor (:attr:`every_size`), else tensors of :data:`IN_PLACE_MIN_NUMEL` elements or more, go piece
        by piece, in place."""
        return self.every_size or numel >= IN_PLACE_MIN_NUMEL

    @property
    def per_tensor_keywords(self) -> frozenset[str]:
        """The rule's keywords, stacked ``(B, …)`` by the optimizer; :meth:`update_into` gets row ``i``."""
        return frozenset({"control"}) if self.rule.scheduled else frozenset()

    def apply_step(self, params: Tensor, direction: Tensor, lr: float) -> None:
        """``params -= lr·direction``, rounded as :meth:`RuleKernel.apply_step` rounds it: piece by piece where that
        rounding needs a temporary ``lr·direction`` (kept to a piece's size), else in one pass — a fused
        subtraction, or ``lr == 1`` (a rule that carries its own step size, as most artifacts do): a 1024 × 1024
        tensor 0.38 ms in pieces, 0.06 ms in one pass (2 threads)."""
        if self.fused_subtract or lr == 1.0:
            super().apply_step(params, direction, lr)
            return
        for index in chunk_indices(params.shape, SUBTRACT_CHUNK):
            params[index].sub_(lr * direction[index])


class CompiledPieces:
    """:func:`~lopt_hf.rules.features.piece_network` compiled by Inductor (:class:`~lopt_hf.kernels.inductor_graphs.InductorGraphs`:
    one graph per piece shape, traced once, called without Dynamo's per-call cost — dozens of pieces per step),
    one per ``(build, readout)`` of the rule; what a kernel lends :func:`~lopt_hf.rules.features.normalized_mlp`
    under compile=True (``StreamHooks.compiled_pieces``), kept from step to step. Compiling goes through the
    kernel's :class:`~lopt_hf.kernels.compiled.Compiler`: if it fails, one warning, that piece runs eagerly and
    the kernel's eager network from then on (None)."""

    def __init__(self, compiler: Compiler) -> None:
        self.compiler = compiler
        self._networks: dict[tuple, InductorGraphs] = {}

    def __call__(self, build: Callable[..., list[Tensor]],
                 readout: Callable[[Tensor], Tensor]) -> Callable[[ElementMajorWeights, tuple], Tensor] | None:
        if self.compiler.failed:
            return None
        key = (build, readout)
        if key not in self._networks:
            self._networks[key] = InductorGraphs(functools.partial(piece_network, build, readout),
                                                 options=CONTRACTED_SKINNY_COMPILE_OPTIONS, fall_back=False,
                                                 what=f"the {self.compiler.rule_name!r} network's pieces")
        graphs = self._networks[key]

        def network(weights: ElementMajorWeights, sources: tuple) -> Tensor:
            return self.compiler.run(lambda: graphs(weights, sources),
                                     lambda: piece_network(build, readout, weights, sources))

        return network


def writable(value: Tensor) -> Tensor:
    """``value`` itself if contiguous (advanced in place), else a contiguous copy (the new state entry)."""
    return value if value.is_contiguous() else value.contiguous()


def advance_moments_in_place(mom_decay: Tensor, rms_decay: Tensor, momentum: Tensor, rms: Tensor, grad: Tensor,
                             index: tuple) -> None:
    """small_fc_lopt's momentum and rms EMAs of ``grad[index]`` written into ``momentum`` / ``rms`` at ``index``
    (``()``: the whole tensor): a streamed piece, or the compiled first pass."""
    at, g = (slice(None), *index), grad[index]
    new_momentum, new_rms = advance_moments(per_piece(mom_decay, g), per_piece(rms_decay, g), momentum[at], rms[at], g)
    momentum[at].copy_(new_momentum)
    rms[at].copy_(new_rms)


def per_piece(decays: Tensor, piece: Tensor) -> Tensor:
    """Decays ``(k, 1, …, 1)`` against a piece's accumulators ``(k, *piece.shape)`` (a piece may have fewer axes)."""
    return decays.reshape(-1, *([1] * piece.dim()))


@register_kernel(PerParamMLP)
class PerParamMLPKernel(InPlaceKernel):
    """``per_param_mlp``: momentum advanced and the network run piece by piece of the flattened tensor."""

    rule: PerParamMLP
    every_size = True

    def update_into(self, out: Tensor, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
                    chunk_size: int | None) -> State:
        momentum = writable(state["momentum"])
        weights = self.rule.network(self.theta)
        flat_p, flat_m, flat_g, flat_out = param.reshape(-1), momentum.view(-1), grad.reshape(-1), out.view(-1)
        for rows in chunk_indices(flat_p.shape, chunk_size):
            flat_m[rows].copy_(ema(flat_m[rows], flat_g[rows], self.rule.momentum_decay))
            h = bias_folded_mlp(feature_matrix(flat_p[rows], flat_m[rows], flat_g[rows]), weights,
                                self.rule.activation, in_place=True)
            flat_out[rows].copy_(self.rule.readout(h))
        return {"momentum": momentum}


@register_kernel(MLPLOpt)
class MLPLOptKernel(InPlaceKernel):
    """``mlp_lopt``: the momenta of each piece advanced in place right before its features."""

    rule: MLPLOpt
    every_size = True
    compiled_parts = True
    compiles_first_pass = True

    def first_pass(self, param: Tensor, grad: Tensor, momentum: Tensor, decays: Tensor) -> Tensor:
        """:meth:`InPlaceKernel.first_pass`: the momenta advanced, the features' mean squares."""
        advance_momentum_in_place(decays, momentum, grad, ())
        return feature_mean_squares(self.rule.features(param, grad, momentum), param.numel())

    def update_into(self, out: Tensor, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
                    chunk_size: int | None) -> State:
        momentum = writable(state["momentum"])
        decays = self.rule.decays(param)

        def advance(index: tuple) -> None:
            advance_momentum_in_place(decays, momentum, grad, index)

        hooks = self.stream_hooks(out, advance, param, grad, momentum, decays)
        self.rule.network_step(self.theta, param, grad, momentum, step, chunk_size, hooks=hooks)
        return {"momentum": momentum}


def advance_momentum_in_place(decays: Tensor, momentum: Tensor, grad: Tensor, index: tuple) -> None:
    """mlp_lopt's momenta of ``grad[index]`` written into ``momentum`` at ``index`` (``()``: the whole tensor): a
    streamed piece, or the compiled first pass."""
    at, g = (slice(None), *index), grad[index]
    momentum[at].copy_(advance_momentum(per_piece(decays, g), momentum[at], g))


@register_kernel(SmallFCLOpt)
class SmallFCLOptKernel(InPlaceKernel):
    """``small_fc_lopt``: momentum and rms of each piece advanced in place right before its features; the
    factored second moments (small for ≥ 2-D tensors) computed whole, as the rule does."""

    rule: SmallFCLOpt
    every_size = True
    compiled_parts = True
    compiles_first_pass = True

    def first_pass(self, param: Tensor, grad: Tensor, momentum: Tensor, rms: Tensor, fac: FactoredFeatures,
                   mom_decay: Tensor, rms_decay: Tensor) -> Tensor:
        """:meth:`InPlaceKernel.first_pass`: ``momentum`` and ``rms`` advanced, the 28 features' mean squares."""
        advance_moments_in_place(mom_decay, rms_decay, momentum, rms, grad, ())
        return feature_mean_squares(self.rule.features(param, grad, momentum, rms, fac), param.numel())

    def update_into(self, out: Tensor, param: Tensor, grad: Tensor, state: State, step: Tensor | int,
                    chunk_size: int | None) -> State:
        momentum, rms = writable(state["momentum"]), writable(state["rms"])
        mom_decay, rms_decay, fac_decay = self.rule.decays(self.theta, param)
        accumulators, fac = self.rule.factored_moments(fac_decay, grad, state)

        def advance(index: tuple) -> None:
            advance_moments_in_place(mom_decay, rms_decay, momentum, rms, grad, index)

        hooks = self.stream_hooks(out, advance, param, grad, momentum, rms, fac, mom_decay, rms_decay)
        self.rule.network_step(self.theta, param, grad, momentum, rms, fac, step, chunk_size, hooks=hooks)
        return {"momentum": momentum, "rms": rms, **accumulators}

