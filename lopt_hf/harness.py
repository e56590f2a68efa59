"""Harnesses: which parameters a learned rule updates, and which go to AdamW instead.

An artifact's ``config.json`` carries the harness as plain data (``"harness"``), so loading it
rebuilds the same routing; ``load_lopt`` builds one ``LearnedOptimizer`` whose param groups
carry ``"route": "learned"`` or ``"route": "adamw"`` (see :mod:`lopt_hf.optim`). One optimizer
object keeps LR schedulers, ``state_dict`` / ``torch.load(weights_only=True)`` and
``transformers.Trainer`` working unchanged.

Harnesses (``config.json`` → ``"harness"``):

``null``
    Every trainable tensor goes through the learned rule (e.g. Celo2-base).

``{"type": "celo2", "mult_1d": 20.0, "adamw_betas": [0.9, 0.95], "adamw_eps": 1e-8, "embedding_patterns": []}``
    Celo2's published optax chain. Tensors with ≤ 1 dim (biases, norm scales, ...), every
    ``nn.Embedding`` / ``nn.EmbeddingBag`` weight of the model and every parameter whose name
    matches one of ``embedding_patterns`` (``re.search`` on names from ``named_parameters()``)
    go to AdamW with ``lr · mult_1d``, ``betas``, ``eps`` and the same decoupled weight decay;
    everything else (hidden matrices, conv kernels) goes through the learned rule, then
    decoupled weight decay, then ``lr``. A learning-rate scheduler scales both groups alike.

Any key can be overridden at load time: ``load_lopt(path, model, harness={"embedding_patterns":
[r"wte|wpe"]})``. With a bare list of tensors instead of a model there are no module types or
names: only the ≤ 1-dim rule applies (a warning says so if patterns were given).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from .optim import ADAMW_ROUTE, LEARNED_ROUTE, ROUTE_KEY

__all__ = ["HARNESS_DEFAULTS", "RULE_PRESETS", "HarnessError", "adamw_parameter_names", "resolve_harness",
           "route_parameters"]

# Every harness type with its keys and their defaults (Celo2's published settings).
HARNESS_DEFAULTS: dict[str, dict[str, Any]] = {
    "celo2": {"mult_1d": 20.0, "adamw_betas": [0.9, 0.95], "adamw_eps": 1e-8, "embedding_patterns": []},
}

# Named optimizers made of one rule, its hyper-parameters and a harness: (rule, rule_config, harness).
# Celo2 = the learned rule + Newton–Schulz for matrices, AdamW for 1-D tensors and embeddings;
# Celo2-base = the learned rule alone on every tensor. Used by the converter and the benchmark.
RULE_PRESETS: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    "celo2": ("celo2", {"orthogonalize": True}, {"type": "celo2", **HARNESS_DEFAULTS["celo2"]}),
    "celo2-base": ("celo2", {"orthogonalize": False}, None),
}


class HarnessError(ValueError):
    """A harness config is invalid."""


def resolve_harness(harness: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None,
                    source: str = "harness") -> dict[str, Any] | None:
    """Validate a harness dict (plus ``overrides``) and fill in defaults; ``None`` means "no harness"."""
    if not harness and not overrides:
        return None
    merged = {**(harness or {}), **(overrides or {})}
    kind = merged.get("type")
    if kind not in HARNESS_DEFAULTS:
        raise HarnessError(f"{source}: unknown harness type {kind!r}; known types: {sorted(HARNESS_DEFAULTS)} "
                           "(or null for none)")
    defaults = HARNESS_DEFAULTS[kind]
    unknown = sorted(set(merged) - set(defaults) - {"type"})
    if unknown:
        raise HarnessError(f"{source}: harness {kind!r} has no setting(s) {unknown}; known: {sorted(defaults)}")
    resolved = {"type": kind, **defaults, **{key: value for key, value in merged.items() if key != "type"}}
    problems = []
    mult = resolved["mult_1d"]
    if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult < 0:
        problems.append(f"mult_1d must be a finite number >= 0, found {mult!r}")
    betas = resolved["adamw_betas"]
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        problems.append(f"adamw_betas must be two numbers in [0, 1), found {betas!r}")
    eps = resolved["adamw_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        problems.append(f"adamw_eps must be a number >= 0, found {eps!r}")
    patterns = resolved["embedding_patterns"]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        problems.append(f"embedding_patterns must be a list of regular expressions, found {patterns!r}")
    else:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append(f"embedding_patterns: {pattern!r} is not a valid regular expression ({err})")
    if problems:
        raise HarnessError(f"{source}: " + "; ".join(problems))
    resolved["adamw_betas"] = [float(b) for b in betas]
    resolved["embedding_patterns"] = list(patterns)
    return resolved


def _embedding_weights(model: nn.Module) -> set[Tensor]:
    return {module.weight for module in model.modules() if isinstance(module, (nn.Embedding, nn.EmbeddingBag))}


def _goes_to_adamw(harness: Mapping[str, Any], param: Tensor, name: str | None, embeddings: set[Tensor],
                   patterns: list[re.Pattern[str]]) -> bool:
    if param.dim() <= 1 or param in embeddings:
        return True
    return name is not None and any(pattern.search(name) for pattern in patterns)


def adamw_parameter_names(harness: Mapping[str, Any] | None, model: nn.Module) -> list[str]:
    """Names of the model's trainable parameters that ``harness`` sends to AdamW (for inspection)."""
    harness = resolve_harness(harness)
    if harness is None:
        return []
    embeddings = _embedding_weights(model)
    patterns = [re.compile(p) for p in harness["embedding_patterns"]]
    return [name for name, param in model.named_parameters()
            if param.requires_grad and _goes_to_adamw(harness, param, name, embeddings, patterns)]


def route_parameters(harness: Mapping[str, Any] | None, params_or_model: nn.Module | Iterable[Any],
                     lr: float) -> list[dict[str, Any]]:
    """Param groups for ``LearnedOptimizer``: the rule's tensors and (if any) AdamW-routed tensors.

    ``params_or_model`` is a model (trainable parameters, module types and names are used), or
    tensors, or param-group dicts (each is split in two, keeping its own settings; its AdamW
    part gets ``lr = group lr · mult_1d``). Empty groups are left out.
    """
    harness = resolve_harness(harness)
    if isinstance(params_or_model, nn.Module):
        named = [(name, p) for name, p in params_or_model.named_parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": named}]
        embeddings = _embedding_weights(params_or_model)
    else:
        items = list(params_or_model)
        if items and all(isinstance(item, Mapping) for item in items):
            groups = [dict(item) for item in items]
        else:
            groups = [{"params": items}]
        embeddings = set()
        for group in groups:
            params = group["params"]
            group["params"] = [(None, params)] if isinstance(params, Tensor) else [(None, p) for p in params]
    if harness is None:
        return [{**g, "params": [p for _, p in g["params"]]} for g in groups]

    patterns = [re.compile(p) for p in harness["embedding_patterns"]]
    if patterns and not isinstance(params_or_model, nn.Module):
        warnings.warn("the harness's embedding_patterns match parameter names, but load_lopt got tensors, not a "
                      "model: only the <= 1-dim rule routes tensors to AdamW (no embedding or name matching)",
                      stacklevel=3)
    routed: list[dict[str, Any]] = []
    for group in groups:
        learned, adamw = [], []
        for name, param in group["params"]:
            (adamw if _goes_to_adamw(harness, param, name, embeddings, patterns) else learned).append(param)
        settings = {key: value for key, value in group.items() if key != "params"}
        if learned:
            routed.append({**settings, "params": learned, ROUTE_KEY: LEARNED_ROUTE})
        if adamw:
            routed.append({**settings, "params": adamw, ROUTE_KEY: ADAMW_ROUTE,
                           "lr": float(settings.get("lr", lr)) * float(harness["mult_1d"]),
                           "betas": tuple(harness["adamw_betas"]), "eps": float(harness["adamw_eps"])})
    return routed
