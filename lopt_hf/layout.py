"""Tensor layouts: PyTorch's weight conventions vs the JAX layout that some rules compute in.

PyTorch stores an ``nn.Linear`` weight as ``(out, in)`` and a convolution weight as
``(out, in, *spatial)`` (OIHW); JAX/flax/haiku store a dense kernel as ``(in, out)`` and a
convolution kernel as ``(*spatial, in, out)`` (HWIO). Most learned rules do not care (they
treat a tensor as a bag of elements, or normalise over all of it), but some do: Celo2
normalises over the last two axes and gives the two largest axes row/column roles. Such a rule
declares ``layout_sensitive = True`` and computes in the JAX layout — the one it was
meta-trained in — and ``LearnedOptimizer`` maps each parameter to that layout before calling
the rule and maps the step back (a transpose/permute view, no change to the parameter itself;
the rule's optimizer state is kept in the rule's layout).

Which tensors to map is decided per parameter, by the module that owns it:

=====================  ==============================  ==================================
module                 torch layout                    rule (JAX) layout
=====================  ==============================  ==================================
``nn.Linear`` weight   ``(out, in)``                   ``(in, out)`` — ``linear``
``nn.ConvNd`` weight   ``(out, in/groups, *spatial)``  ``(*spatial, in/groups, out)`` — ``conv``
``nn.ConvTransposeNd`` ``(in, out/groups, *spatial)``  ``(*spatial, in, out/groups)`` — ``conv_transpose``
anything else          unchanged                       unchanged — ``as_is``
=====================  ==============================  ==================================

"Anything else" includes biases, norms, ``nn.Embedding`` weights (``(num, dim)`` in both
frameworks) and transformers' GPT-2 style ``Conv1D`` (already ``(in, out)``).

``infer_layouts(model)`` finds these from a model (``load_lopt`` does this when given a model).
For a bare list of tensors there is no module to ask, so the documented default,
:func:`default_layout`, follows PyTorch's conventions by rank: 2-D → ``linear``, ≥ 3-D →
``conv``, 0-/1-D → ``as_is``. (A bare-list embedding is thus transposed; pass the model, or
``param_layouts=``, when that matters.)
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

AS_IS = "as_is"
LINEAR = "linear"
CONV = "conv"
CONV_TRANSPOSE = "conv_transpose"
LAYOUTS = (AS_IS, LINEAR, CONV, CONV_TRANSPOSE)

__all__ = ["AS_IS", "CONV", "CONV_TRANSPOSE", "LAYOUTS", "LINEAR", "check_layouts", "default_layout",
           "from_rule_layout", "infer_layouts", "to_rule_layout"]


def default_layout(param: Tensor) -> str:
    """The layout assumed for a tensor with no known owner: PyTorch conventions by rank."""
    if param.dim() == 2:
        return LINEAR
    if param.dim() >= 3:
        return CONV
    return AS_IS


def _permutation(layout: str, ndim: int) -> list[int] | None:
    """Axes order taking a torch-layout tensor to the rule layout (None: unchanged)."""
    if layout == AS_IS or ndim < 2:
        return None
    if layout == LINEAR:
        if ndim != 2:
            raise ValueError(f"a 'linear' weight must be 2-D, got {ndim}-D")
        return [1, 0]
    if layout == CONV:  # (O, I, *K) -> (*K, I, O)
        return [*range(2, ndim), 1, 0]
    if layout == CONV_TRANSPOSE:  # (I, O, *K) -> (*K, I, O)
        return [*range(2, ndim), 0, 1]
    raise ValueError(f"unknown layout {layout!r}; known layouts: {list(LAYOUTS)}")


def to_rule_layout(tensor: Tensor, layout: str, stacked: bool = False) -> Tensor:
    """View of a torch-layout ``tensor`` in the rule (JAX) layout.

    ``stacked``: ``tensor`` is a stack of same-layout tensors along a leading axis, which stays first.
    """
    order = _permutation(layout, tensor.dim() - stacked)
    if order is None:
        return tensor
    return tensor.permute([0, *(axis + 1 for axis in order)] if stacked else order)


def from_rule_layout(tensor: Tensor, layout: str, stacked: bool = False) -> Tensor:
    """Inverse of :func:`to_rule_layout`: a rule-layout ``tensor`` back in the torch layout."""
    order = _permutation(layout, tensor.dim() - stacked)
    if order is None:
        return tensor
    inverse = [0] * len(order)
    for position, axis in enumerate(order):
        inverse[axis] = position
    return tensor.permute([0, *(axis + 1 for axis in inverse)] if stacked else inverse)


def infer_layouts(model: nn.Module) -> dict[Tensor, str]:
    """Layout of every parameter of ``model`` (see the module docstring), keyed by the tensor.

    An embedding weight tied to an output ``nn.Linear`` (GPT-2's ``lm_head``) stays ``as_is``:
    JAX models tie it the same way (``(num, dim)``, used transposed by ``attend``).
    """
    layouts: dict[Tensor, str] = {}
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            layouts[module.weight] = AS_IS
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            continue
        if isinstance(module, nn.Linear):
            layouts.setdefault(weight, LINEAR)
        elif isinstance(module, nn.modules.conv._ConvNd):
            layouts.setdefault(weight, CONV_TRANSPOSE if module.transposed else CONV)
    for param in model.parameters():
        layouts.setdefault(param, AS_IS)
    return layouts


def check_layouts(layouts: Mapping[Tensor, str] | None) -> None:
    """Raise ``ValueError`` for an unknown layout name or a layout that does not fit its tensor."""
    for tensor, layout in (layouts or {}).items():
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r} for a tensor of shape {tuple(tensor.shape)}; "
                             f"known layouts: {list(LAYOUTS)}")
        _permutation(layout, tensor.dim())
