"""The compiled deployment execution: a rule's step through ``torch.compile`` (``LearnedOptimizer(compile=True)``).

Eager PyTorch runs a per-element rule as dozens of kernels, each a pass over memory: Celo builds 30
feature tensors, reduces each, concatenates them and multiplies the result by a 31×5 matrix. Inductor
fuses such element-wise work into a few loops; for a small per-element network
(:func:`~lopt_hf.rules.features.unrolls`: Celo's and VeLO's 30→4→4→3) ``normalized_mlp`` writes the
network out unit by unit when it is being compiled, so no feature matrix is ever built. Rules without a
network (Celo-Adam: Adam's element-wise passes fused, Newton–Schulz's products stay library calls)
compile too.

Celo2's network (30→8→8→3) is larger, but its row and column statistics fold into per-row and per-column terms
of the first layer, so each element's network is ~230 multiply-adds: compiled, ``Celo2._unrolled_network``
writes it out unit by unit too (:attr:`~lopt_hf.rules.base.UpdateRule.unrolls_when_compiled`), fused with
features and readout into one loop per tensor (its eager kernel runs dozens of passes and thin BLAS products
per piece). ``per_param_mlp``'s 3→64→2 network is too wide to unroll, but each of its products is skinny (4
inputs with the bias, 2 outputs): compiled, they are written as broadcast products
(:func:`~lopt_hf.rules.features.compiled_skinny_product`, as meta-training's compiled step writes them) that
Inductor fuses into one loop over the elements — 5× faster than its eager kernel's thin BLAS products on a
1024×1024 tensor. :func:`compiles` says which rules take this path. Rules with wide products
(``small_fc_lopt``, ``mlp_lopt``) keep their eager kernels: their time is in matrix products that BLAS
runs faster than unrolled code (small_fc_lopt's skinny-compiled step measured 2.3× slower than eager), and
compiled as a whole they measured slower or took minutes to compile (the chunked streaming unrolls into the
graph). A kernel may compile parts of its step instead (:meth:`~lopt_hf.kernels.base.RuleKernel.compile_parts`,
:func:`compiled_kernel`): the first pass — ``small_fc_lopt``'s 28 features or ``mlp_lopt``'s momenta built and
reduced piece by piece for the per-tensor normalisation, eagerly dozens of passes over memory — compiles over
the whole tensor into one fused pass (no feature is materialised); and ``mlp_lopt``'s network, whose first layer
is skinny (5 features), runs compiled piece by piece (:class:`~lopt_hf.kernels.in_place.CompiledPieces`:
features and first layer fused, the 32-wide hidden product a BLAS call), while ``small_fc_lopt``'s products stay
BLAS calls.

The compiled step is the same math in another order of float operations (sums, the folded
normalisation), so its results differ from the eager kernel's in the last bits (a test bounds the
difference); it computes new state tensors like the rule's ``update`` (the state handed in is left as it
is), so tensors of ≥ 4M elements (``in_place.IN_PLACE_MIN_NUMEL``) that the eager kernel advances in place keep
the eager kernel, whose peak memory stays near AdamW's; below, the compiled step trades memory for speed (Celo
eager is in place at every size). One graph per kind of tensor (shape and state
layout; static shapes, Inductor's fastest loops), compiled on the first step that meets it — seconds
each, cached for the process and by Inductor on disk, shared by every optimizer of the same rule. If
compiling fails (e.g. no C++ compiler for Inductor), the kernel warns once and steps with the eager
kernel from then on: the same results up to rounding, never a failed step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..rules.base import State, UpdateRule, as_step_tensor
from ..rules.features import CONTRACTED_SKINNY_COMPILE_OPTIONS, SKINNY_COMPILE_OPTIONS, UNROLL_MACS, is_skinny
from ..warning_location import stacklevel_outside_libraries
from . import in_place
from .base import RuleKernel, kernel_class, stack_states, unstack_states
from .inductor_graphs import InductorGraphs

# Graphs kept per compiled function (torch's default, 8, is fewer than the distinct tensor shapes of many
# models: each shape is a graph of its own, and a shape beyond the limit would silently run eagerly).
RECOMPILE_LIMIT = 64

_T = TypeVar("_T")


def compiles(rule: UpdateRule) -> bool:
    """Whether ``rule`` takes the compiled path under ``compile=True``: it has no per-element network
    (element-wise arithmetic, Newton–Schulz), one of at most :data:`~lopt_hf.rules.features.UNROLL_MACS`
    multiply-adds per element or one the rule writes out itself
    (:attr:`~lopt_hf.rules.base.UpdateRule.unrolls_when_compiled`: Celo2), which the compiled step unrolls, or
    one whose every layer (with its folded bias input and carry unit) is a skinny product the compiled step
    writes as broadcast products (:func:`~lopt_hf.rules.features.is_skinny`: per_param_mlp's 3→64→2)."""
    flops = rule.per_element_flops()
    return flops is None or flops <= 2 * UNROLL_MACS or rule.unrolls_when_compiled or writes_skinny_network(rule)


def writes_skinny_network(rule: UpdateRule) -> bool:
    """Whether every layer of ``rule``'s per-element network (with its folded bias input and carry unit) is a
    skinny product (:func:`~lopt_hf.rules.features.is_skinny`: per_param_mlp's 3→64→2), which the compiled step
    writes as broadcast products."""
    layers = rule.network_layers()
    return layers is not None and all(is_skinny(inner + 1, outer + 1) for inner, outer in layers)


def takes_compiled_path(rule: UpdateRule) -> bool:
    """Whether ``compile=True`` changes how ``rule`` steps: its whole step compiles (:func:`compiles`) or its
    kernel compiles parts of it (:attr:`~lopt_hf.kernels.base.RuleKernel.compiled_parts`: small_fc_lopt's and
    mlp_lopt's first pass, mlp_lopt's network by pieces)."""
    return compiles(rule) or kernel_class(rule).compiled_parts


def compiled_kernel(kernel: RuleKernel) -> RuleKernel:
    """``kernel`` as ``LearnedOptimizer(compile=True)`` steps it: its whole step through ``torch.compile``
    (:class:`CompiledKernel`) where the rule :func:`compiles`, else with its compiled parts
    (:meth:`~lopt_hf.kernels.base.RuleKernel.compile_parts`), else as it is."""
    if compiles(kernel.rule):
        return CompiledKernel(kernel)
    if kernel.compiled_parts:
        kernel.compile_parts(Compiler(kernel.rule))
    return kernel


def compile_options(rule: UpdateRule) -> dict[str, Any]:
    """``torch.compile``'s options for ``rule``'s step: :attr:`Compiler.OPTIONS`, except that a rule that
    :attr:`~lopt_hf.rules.base.UpdateRule.unrolls_when_compiled` keeps Inductor's own choice of which shared
    values to store: Celo2's per-row and per-column statistics each feed every element of their row or column,
    and inlined (``SKINNY_COMPILE_OPTIONS``) every element recomputes them — its compiled graphs took 23 ms
    instead of 15 ms per step on the GPT-2 of ``scripts/bench_trainer.py``; and that a rule whose network is
    written out with skinny products (:func:`writes_skinny_network`) gets its multiply-adds contracted
    (``CONTRACTED_SKINNY_COMPILE_OPTIONS``)."""
    if rule.unrolls_when_compiled:
        return {key: value for key, value in Compiler.OPTIONS.items() if key != "options"}
    if writes_skinny_network(rule):
        return {**Compiler.OPTIONS, "options": CONTRACTED_SKINNY_COMPILE_OPTIONS}
    return Compiler.OPTIONS


class Compiler:
    """``torch.compile`` for one kernel, with an eager fallback: if compiling fails (e.g. no C++ compiler for
    Inductor), one warning, and each of the kernel's compiled functions runs eagerly from then on."""

    # One graph per shape (static shapes: Inductor's best loops; the dynamic-shape graph of Celo's step measured
    # 1.4× slower on a 1024×1024 tensor).
    OPTIONS: dict[str, Any] = {"fullgraph": True, "dynamic": False, "options": SKINNY_COMPILE_OPTIONS}

    def __init__(self, rule: UpdateRule) -> None:
        self.rule_name = rule.name
        self.options = compile_options(rule)
        self.failed = False

    def compile(self, fn: Callable[..., _T]) -> Callable[..., _T]:
        """``fn`` through ``torch.compile``, ``fn`` itself once compiling has failed."""
        compiled = torch.compile(fn, **self.options)
        return lambda *args: self.run(lambda: compiled(*args), lambda: fn(*args))

    def run(self, compiled: Callable[[], _T], eager: Callable[[], _T]) -> _T:
        """``compiled()``; if compiling fails, one warning and ``eager()`` — now and for every later call."""
        if self.failed:
            return eager()
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return compiled()
        except Exception as error:  # noqa: BLE001  (Inductor's failures have many types; the eager kernel is exact)
            self.failed = True
            warnings.warn(f"compiling the {self.rule_name!r} step failed ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); stepping eagerly from now on",
                          RuntimeWarning, stacklevel=stacklevel_outside_libraries())
            return eager()


class CompiledKernel(RuleKernel):
    """``eager``'s rule with ``torch.compile`` around ``rule.update_stacked`` (a rule whose network is written out
    with skinny products, per_param_mlp: Inductor without Dynamo, :class:`~lopt_hf.kernels.inductor_graphs.InductorGraphs`);
    everything else (state initialisation, how the step is subtracted, stacking) is ``eager``'s, so a run can
    switch between the two and a checkpoint of one loads into the other."""

    def __init__(self, eager: RuleKernel) -> None:
        super().__init__(eager.rule, eager.theta)
        self.eager = eager
        self.compiler = Compiler(eager.rule)
        # A stack of one tensor goes through ``update`` on the tensor itself, so the state it keeps is the
        # compiled graph's own output, never a view (views add guards on their base).
        if writes_skinny_network(self.rule):
            # Its compiled form needs only a trace marked for Inductor (``features.writes_skinny_products``), so
            # Inductor compiles it without Dynamo, whose per-call cost (≈ 0.15–0.2 ms) is ≈ 1 ms of per_param_mlp's
            # 9 ms step on the bench MLP's 6 tensors (InductorGraphs, as meta-training's inner step).
            graphs = {name: InductorGraphs(fn, options=self.compiler.options["options"], fall_back=False,
                                           what=f"the {self.rule.name!r} step")
                      for name, fn in (("one", self._update_one), ("stack", self._update_stack))}
            self._one, self._stack = graphs["one"], graphs["stack"]
        else:
            self._one = torch.compile(self._update_one, **self.compiler.options)
            self._stack = torch.compile(self._update_stack, **self.compiler.options)
        self._summary = torch.compile(self.eager.tensor_summary, **self.compiler.options)

    @property
    def stacks(self) -> bool:
        return self.eager.stacks

    @property
    def fused_subtract(self) -> bool:
        return self.eager.fused_subtract

    def init_state(self, param: Tensor) -> State:
        """The eager kernel's state; for the tensors this kernel steps compiled, row-major (Celo2's kernel keeps an
        ``nn.Linear`` weight's state column-major, its transposed memory order; the graph gets the parameter and
        gradient row-major, and a mix of the two orders makes Inductor's loops transpose tiles — Celo2-base on the
        bench MLP measured 2.7× slower than eager)."""
        state = self.eager.init_state(param)
        if self._steps_eagerly(param.numel()):
            return state  # in the eager kernel's own memory order
        return {key: value.contiguous() if isinstance(value, Tensor) else value for key, value in state.items()}

    def apply_step(self, params: Tensor, direction: Tensor, lr: float) -> None:
        self.eager.apply_step(params, direction, lr)

    def _steps_eagerly(self, numel: int) -> bool:
        """Tensors of ``numel`` elements go through the eager kernel: large ones whose in-place pieces keep memory
        near AdamW's, where the compiled graph builds the new state whole (Celo on 16M elements: 4.95× AdamW's
        peak against 1.79×)."""
        return numel >= in_place.IN_PLACE_MIN_NUMEL and self.eager.in_place(numel)

    def _update_one(self, theta: dict[str, Tensor], param: Tensor, grad: Tensor, state: State, step: Tensor,
                    kwargs: dict[str, Tensor]) -> tuple[Tensor, State]:
        return self.rule.update(theta, param, grad, state, step, None, **kwargs)

    def _update_stack(self, theta: dict[str, Tensor], params: Tensor, grads: Tensor, states: State, step: Tensor,
                      kwargs: dict[str, Tensor]) -> tuple[Tensor, State]:
        return self.rule.update_stacked(theta, params, grads, states, step, None, **kwargs)

    def update_stack(self, params: Tensor, grads: Tensor, states: list[State], step: Tensor | int,
                     chunk_size: int | None = None, **kwargs: Any) -> tuple[Tensor, list[State]]:
        if self._steps_eagerly(params[0].numel()):
            return self.eager.update_stack(params, grads, states, step, chunk_size, **kwargs)
        # the step count as a tensor: a Python int would be compiled in as a constant (a new graph every step)
        count = as_step_tensor(step, params)
        # one memory order for every input: a transposed view among row-major states makes Inductor's loops
        # transpose tiles (Celo on a 1024×1024 nn.Linear weight: 70–72 against 49–50 ms with contiguous copies)
        params, grads = params.contiguous(), grads.contiguous()

        def compiled() -> tuple[Tensor, list[State]]:
            if len(states) == 1:  # a scheduled rule's control is per tensor (B, C); a loss is shared
                row = {key: value[0] if key == "control" else value for key, value in kwargs.items()}
                direction, new_state = self._one(self.theta, params[0], grads[0], states[0], count, row)
                return direction.unsqueeze(0), [new_state]
            direction, new_states = self._stack(self.theta, params, grads, stack_states(states), count, kwargs)
            return direction, unstack_states(new_states, len(states))

        return self.compiler.run(
            compiled, lambda: self.eager.update_stack(params, grads, states, step, chunk_size, **kwargs))

    def tensor_summary(self, param: Tensor, grad: Tensor, state: State) -> Tensor:
        return self.compiler.run(lambda: self._summary(param, grad, state),
                                 lambda: self.eager.tensor_summary(param, grad, state))
