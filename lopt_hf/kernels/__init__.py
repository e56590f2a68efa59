"""Deployment executions of the update rules (layer 2: imports ``lopt_hf.rules``, never the optimizer).

A rule (``lopt_hf.rules``) is math only: pure functions that meta-training vmaps and
differentiates. ``LearnedOptimizer`` does not call it directly but through a *kernel*,
:func:`kernel_for` ``(rule, theta)``: an object that owns what an execution on a real model needs
and a pure function must not keep — reused buffers, weights prepared once for a fixed theta, the
memory order of the state, the stacking of same-shape tensors. A kernel computes the rule's own
math (tests prove each fast path equals the reference rule).

* :class:`RuleKernel` — any rule: ``rule.init_state`` and ``rule.update_stacked`` (the default of
  which is the per-tensor ``update`` over the stack);
* :class:`~lopt_hf.kernels.celo2.Celo2Kernel` — Celo2 with a workspace (buffers, prepared
  weights, blocked Newton–Schulz products) and column-major state for transposed matrices;
* :class:`~lopt_hf.kernels.in_place.InPlaceKernel` — ``small_fc_lopt``, ``mlp_lopt`` and
  ``per_param_mlp`` piece by piece, their full-size state advanced in place (memory ≤ 2× AdamW's);
  :mod:`~lopt_hf.kernels.celo` does the same for the scheduled ``celo``, ``velo`` and ``celo_adam``;
* :class:`~lopt_hf.kernels.compiled.CompiledKernel` — ``LearnedOptimizer(compile=True)``: any of the above
  for the rules it speeds up (:func:`~lopt_hf.kernels.compiled.compiles`), its step through ``torch.compile``;
  other kernels may compile parts of their step (``RuleKernel.compile_parts``: small_fc_lopt's first pass).
"""

from .base import RuleKernel, kernel_for, register_kernel
from . import celo2  # noqa: F401  (registers the Celo2 kernel)
from . import in_place  # noqa: F401  (registers the in-place kernels of the per-element rules)
from . import celo  # noqa: F401  (registers the in-place kernels of Celo, VeLO and Celo-Adam)

__all__ = ["RuleKernel", "kernel_for", "register_kernel"]
