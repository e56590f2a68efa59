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
    matches one of ``embedding_patterns`` (``re.search`` on names from ``named_parameters()``;
    patterns that could backtrack for long are refused, see :func:`pattern_problem`)
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

try:  # the regular-expression parser, to vet patterns before they run (Python >= 3.11 names)
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

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


# Bounds of a harness from an artifact (checked by resolve_harness): mult_1d scales lr for the
# AdamW-routed tensors (Celo2 uses 20); patterns run against every parameter name (see pattern_problem).
MAX_MULT_1D = 1e4
MAX_PATTERNS = 64
MAX_PATTERN_LENGTH = 256
_REPEATS = frozenset({sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT}
                     | ({sre_constants.POSSESSIVE_REPEAT} if hasattr(sre_constants, "POSSESSIVE_REPEAT") else set()))


class HarnessError(ValueError):
    """A harness config is invalid."""


def resolve_harness(harness: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None,
                    source: str = "harness") -> dict[str, Any] | None:
    """Validate a harness dict (plus ``overrides``) and fill in defaults; ``None`` means "no harness"."""
    if not harness and not overrides:
        return None
    merged = {**(harness or {}), **(overrides or {})}
    kind = merged.get("type")
    if not isinstance(kind, str) or kind not in HARNESS_DEFAULTS:
        raise HarnessError(f"{source}: unknown harness type {kind!r}; known types: {sorted(HARNESS_DEFAULTS)} "
                           "(or null for none)")
    defaults = HARNESS_DEFAULTS[kind]
    unknown = sorted(str(key) for key in set(merged) - set(defaults) - {"type"})
    if unknown:
        raise HarnessError(f"{source}: harness {kind!r} has no setting(s) {unknown}; known: {sorted(defaults)}")
    resolved = {"type": kind, **defaults, **{key: value for key, value in merged.items() if key != "type"}}
    problems = []
    mult = _finite_number(resolved["mult_1d"])
    if mult is None or not 0 <= mult <= MAX_MULT_1D:
        problems.append(f"mult_1d must be a finite number in [0, {MAX_MULT_1D:g}], found {_short(resolved['mult_1d'])}")
    betas = resolved["adamw_betas"]
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        problems.append(f"adamw_betas must be two numbers in [0, 1), found {_short(betas)}")
    eps = _finite_number(resolved["adamw_eps"])
    if eps is None or not 0 < eps <= 1:
        # eps = 0 turns a tensor whose gradient (hence second moment) is 0 into 0/0 = NaN
        problems.append(f"adamw_eps must be a number in (0, 1], found {_short(resolved['adamw_eps'])}")
    patterns = resolved["embedding_patterns"]
    if (not isinstance(patterns, (list, tuple)) or len(patterns) > MAX_PATTERNS
            or not all(isinstance(p, str) for p in patterns)):
        problems.append(f"embedding_patterns must be a list of at most {MAX_PATTERNS} regular expressions, "
                        f"found {_short(patterns)}")
    else:
        for pattern in patterns:
            problem = pattern_problem(pattern)
            if problem:
                problems.append(f"embedding_patterns: {_short(pattern)} {problem}")
    if problems:
        raise HarnessError(f"{source}: " + "; ".join(problems))
    resolved["adamw_betas"] = [float(b) for b in betas]
    resolved["embedding_patterns"] = list(patterns)
    return resolved


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        text = "a huge integer"
    return text if len(text) <= limit else text[:limit] + "..."


def _repeat_nodes(parsed: Any) -> Iterable[tuple[Any, Any]]:
    """(opcode, argument) of every node of a parsed pattern, depth first."""
    for op, arg in parsed:
        yield op, arg
        if op in _REPEATS:
            yield from _repeat_nodes(arg[2])
        elif op is sre_constants.SUBPATTERN:
            yield from _repeat_nodes(arg[3])
        elif op is sre_constants.BRANCH:
            for branch in arg[1]:
                yield from _repeat_nodes(branch)
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            yield from _repeat_nodes(arg[1])
        elif op is getattr(sre_constants, "ATOMIC_GROUP", None):
            yield from _repeat_nodes(arg)


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` may not be an embedding pattern (``None``: it is fine).

    Patterns can come from a downloaded artifact and run against every parameter name, so only
    regular expressions whose matching time stays polynomial and small are accepted: at most
    :data:`MAX_PATTERN_LENGTH` characters, no backreferences or conditionals, no repetition
    (``*``, ``+``, ``{m,n}``) containing another repetition, an alternation or a lookaround, at most
    two unbounded-ish repetitions (``max > 1``) and at most 64 combinations of alternatives and ``?``.
    Plain names, ``|``-alternatives, ``^``/``$``, character classes and one or two ``.*`` pass.
    """
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"is longer than {MAX_PATTERN_LENGTH} characters"
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        return f"is not a valid regular expression ({err})"
    repeats, combinations = 0, 1
    for op, arg in _repeat_nodes(parsed):
        if op in (sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS):
            return "uses a backreference or conditional, which can take exponential time"
        if op is sre_constants.BRANCH:
            combinations *= len(arg[1])
        elif op in _REPEATS:
            low, high, body = arg
            if high > 1:
                repeats += 1
                inner = {inner_op for inner_op, _ in _repeat_nodes(body)}
                if inner & (_REPEATS | {sre_constants.BRANCH, sre_constants.ASSERT, sre_constants.ASSERT_NOT,
                                        sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS}):
                    return ("repeats a group that itself repeats or alternates (e.g. (a+)* or (a|ab)*), which can "
                            "take exponential time; use a character class or a simpler pattern")
            else:
                combinations *= 2
    if repeats > 2:
        return "has more than two repetitions (*, +, {m,n}), which can take a long time on long names"
    if combinations > 64:
        return "has too many alternatives and optional parts (more than 64 combinations)"
    return None


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
