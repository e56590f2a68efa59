"""``load_lopt``: from an artifact (local folder or Hub repo id) to a ready torch optimizer."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from .harness import resolve_harness, route_parameters
from .hub import LearnedOptimizerModel, load_artifact
from .layout import infer_layouts
from .loader_options import download_option_names
from .optim import LearnedOptimizer

# Settings of ``LearnedOptimizer`` an artifact's ``optimizer_defaults`` or the caller may set.
OPTIMIZER_SETTINGS = ("lr", "weight_decay", "chunk_size", "compile")


def load_lopt(repo_or_path: str | os.PathLike[str] | LearnedOptimizerModel,
              params_or_model: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
              **overrides: Any) -> LearnedOptimizer:
    """Load a learned optimizer and attach it to a model's parameters.

    Args:
        repo_or_path: a local artifact folder, a Hub repo id (``"user/name"``), or an already
            loaded ``LearnedOptimizerModel``.
        params_or_model: an ``nn.Module`` (all its trainable parameters) or what any torch
            optimizer accepts (tensors or param-group dicts).
        **overrides: ``lr``, ``weight_decay``, ``chunk_size`` override the artifact's
            ``optimizer_defaults``; ``compile=True`` steps through ``torch.compile`` where that pays
            (see :class:`~lopt_hf.optim.LearnedOptimizer`); ``revision`` and the download options
            (``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``proxies``, ... — whatever
            ``hf_hub_download`` takes) select and fetch the artifact on the Hub; ``harness`` — a dict merged over
            the artifact's harness (e.g. ``{"embedding_patterns": [r"wte"]}``), or ``None`` to
            send every tensor through the learned rule (see :mod:`lopt_hf.harness`).

    The artifact's harness (if any) routes tensors between the learned rule and AdamW inside
    the one returned optimizer. Given a model, layout-sensitive rules learn which tensors are
    ``nn.Linear`` / convolution weights from it (:func:`lopt_hf.layout.infer_layouts`); given
    tensors, :func:`lopt_hf.layout.default_layout` applies.

    Returns:
        A ``LearnedOptimizer`` (a ``torch.optim.Optimizer``).
    """
    artifact, overrides = resolve_artifact(repo_or_path, overrides, caller="load_lopt")
    harness_given = "harness" in overrides
    harness_override = overrides.pop("harness", None)
    settings = {key: value for key, value in artifact.config.optimizer_defaults.items() if key in OPTIMIZER_SETTINGS}
    settings.update(overrides)
    if harness_given and harness_override is None:
        harness = None
    else:
        label = artifact.config.name_or_path or "the artifact"
        harness = resolve_harness(artifact.config.harness, harness_override, source=f"harness of {label}")
    params = _trainable_parameters(params_or_model)
    if harness is not None:
        params = route_parameters(harness, params_or_model if isinstance(params_or_model, nn.Module) else params,
                                  lr=float(settings.get("lr", 1.0)))
    layouts = infer_layouts(params_or_model) if isinstance(params_or_model, nn.Module) else None
    optimizer = LearnedOptimizer(params, artifact.rule, artifact.theta(), param_layouts=layouts, **settings)
    optimizer.artifact_defaults = dict(artifact.config.optimizer_defaults or {})
    return optimizer


def resolve_artifact(repo_or_path: str | os.PathLike[str] | LearnedOptimizerModel, overrides: dict[str, Any],
                     caller: str) -> tuple[LearnedOptimizerModel, dict[str, Any]]:
    """Check ``overrides``' names, load the artifact (or take a loaded one) with the hub options.

    Returns the artifact and the remaining overrides (optimizer settings and ``harness``).
    """
    hub_names = download_option_names() | {"revision"}
    unknown = sorted(set(overrides) - hub_names - set(OPTIMIZER_SETTINGS) - {"harness"})
    if unknown:
        raise TypeError(f"{caller} got unknown keyword argument(s) {unknown}; optimizer settings are "
                        f"{list(OPTIMIZER_SETTINGS)} and 'harness', hub options are {sorted(hub_names)}")
    hub_kwargs = {key: value for key, value in overrides.items() if key in hub_names}
    rest = {key: value for key, value in overrides.items() if key not in hub_names}
    if isinstance(repo_or_path, LearnedOptimizerModel):
        if hub_kwargs:
            raise TypeError(f"hub options {sorted(hub_kwargs)} make no sense with an already loaded artifact")
        return repo_or_path, rest
    return load_artifact(repo_or_path, **hub_kwargs), rest


def _trainable_parameters(params_or_model: nn.Module | Iterable[Any]) -> list[Any]:
    if isinstance(params_or_model, nn.Module):
        params: list[Any] = [p for p in params_or_model.parameters() if p.requires_grad]
    else:
        params = list(params_or_model)
    if not params:
        raise ValueError("load_lopt got no parameters to optimize")
    return params


