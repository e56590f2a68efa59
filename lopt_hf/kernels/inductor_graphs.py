"""Functions of tensors compiled by Inductor directly: traced by ``make_fx``, compiled by ``compile_fx``.

Meta-training's compiled inner step and deployment's compiled pieces of a per-element network
(:func:`lopt_hf.rules.features.piece_network`) call a pure function of tensors many times with inputs of a few
signatures. ``torch.compile`` would run each call through Dynamo — frame evaluation, guards, a module call —
which costs 0.1–0.4 ms per call for a graph that has no Python left to guard (6 % of the tutorial's inner step;
dozens of pieces per optimizer step). Here the function is traced once per signature into an aten graph (inside
:func:`~lopt_hf.rules.features.tracing_for_inductor`, so per-element networks are written as they are inside
``torch.compile``) and Inductor compiles that graph for these static shapes; the signature (tree structure, and
each tensor's shape, strides, dtype and device) keys the cache, pinning what Dynamo's guards would check, since
Inductor's graph asserts the sizes and strides it was compiled for. A signature whose graph cannot be built
(e.g. no C++ compiler for Inductor) warns once and runs ``fn`` eagerly from then on (the same math, another
rounding) — or, with ``fall_back=False``, raises for the caller's own fallback.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ..rules.features import tracing_for_inductor
from ..warning_location import stacklevel_outside_libraries


class InductorGraphs:
    """``fn`` (a pure function of a tree of tensors, returning a tree of tensors) compiled once per signature of its
    arguments.

    ``options``: Inductor configuration for its graphs (``torch._inductor.config`` keys); ``decompositions``: an aten
    decomposition table for the trace (meta-training's skinny and narrow products); ``what``: how a warning names
    the function when its compilation fails; ``fall_back``: whether a signature that fails to compile runs ``fn``
    eagerly (one warning) or raises. Calls run without autograd through the graph (it is traced and compiled for
    inference)."""

    def __init__(self, fn: Callable[..., Any], *, options: Mapping[str, Any], what: str,
                 decompositions: Mapping[Any, Callable[..., Any]] | None = None, fall_back: bool = True) -> None:
        self.fn = fn
        self.options = dict(options)
        self.what = what
        self.fall_back = fall_back
        self.decompositions = dict(decompositions or {})
        # signature -> (compiled graph, output tree structure), or None: compiling it failed, run fn eagerly
        self._graphs: dict[Any, tuple[Callable[..., Any], pytree.TreeSpec] | None] = {}

    def __len__(self) -> int:
        """Graphs compiled so far."""
        return sum(entry is not None for entry in self._graphs.values())

    def __call__(self, *args: Any) -> Any:
        leaves, spec = pytree.tree_flatten(args)
        if not all(isinstance(leaf, Tensor) for leaf in leaves):
            raise TypeError(f"{self.what}: every argument leaf must be a tensor, got "
                            f"{sorted({type(leaf).__name__ for leaf in leaves if not isinstance(leaf, Tensor)})}")
        key = (spec, tuple((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device) for leaf in leaves))
        if key not in self._graphs:
            try:
                compiled, out_spec = self._build(spec, leaves)
                result = pytree.tree_unflatten(list(compiled(*leaves)), out_spec)  # Inductor compiles on this call
                self._graphs[key] = (compiled, out_spec)
                return result
            except Exception as error:  # noqa: BLE001  (Inductor's failures have many types; fn itself is exact)
                if not self.fall_back:
                    raise
                self._graphs[key] = None
                warnings.warn(f"compiling {self.what} failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); running it eagerly",
                              RuntimeWarning, stacklevel=stacklevel_outside_libraries())
        entry = self._graphs[key]
        if entry is None:
            return self.fn(*args)
        compiled, out_spec = entry
        return pytree.tree_unflatten(list(compiled(*leaves)), out_spec)

    def _build(self, spec: pytree.TreeSpec, leaves: list[Tensor]) -> tuple[Callable[..., Any], pytree.TreeSpec]:
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        from torch.fx.experimental.proxy_tensor import make_fx

        out_specs: list[pytree.TreeSpec] = []

        def flat_fn(*flat: Tensor) -> list[Tensor]:
            out_leaves, out_spec = pytree.tree_flatten(self.fn(*pytree.tree_unflatten(list(flat), spec)))
            out_specs.append(out_spec)
            return out_leaves

        example = [leaf.detach() for leaf in leaves]
        with torch.no_grad(), tracing_for_inductor():
            graph = make_fx(flat_fn, decomposition_table=self.decompositions)(*example)
        with inductor_config.patch(self.options):
            return compile_fx(graph, example), out_specs[-1]
