"""Validation of learned-optimizer artifacts (``config.json`` + ``model.safetensors``).

Everything here reads plain data — JSON text and the safetensors byte layout — and checks it
against the update rule that the config names. Nothing is ever unpickled, imported or executed:
the rule name is looked up in lopt_hf's own registry and nowhere else.

Every problem raises :class:`ArtifactError` whose message starts with the offending file (or the
call that supplied the data) and then says what is wrong, e.g.::

    /runs/x/model.safetensors: theta does not match rule 'per_param_mlp':
      - tensor 'w0': shape (3, 32), expected (3, 64)
      - missing tensor 'b1' (float32, shape (2,))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .harness import HarnessError, resolve_harness
from .rules import UpdateRule, available_rules, build_rule, rule_class

FORMAT_VERSION = 1
"""The artifact format this version of lopt_hf writes and the newest it can read."""

MODEL_TYPE = "learned_optimizer"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"
# provenance key holding the sha256 (hex) of model.safetensors, written by save_pretrained and verified on
# load. A provenance entry rather than a config key, so older lopt_hf versions still read new artifacts
# and artifacts without it (written before it existed) still load.
WEIGHTS_SHA256_KEY = "weights_sha256"

DEFAULT_OPTIMIZER_DEFAULTS: dict[str, Any] = {"lr": 1.0, "weight_decay": 0.0}

# Our own config.json keys (see LearnedOptimizerConfig).
ARTIFACT_KEYS = ("rule", "rule_config", "optimizer_defaults", "harness", "format_version", "provenance")
# Keys transformers itself writes into / reads from every config.json; accepted and ignored.
TRANSFORMERS_KEYS = frozenset({
    "model_type", "transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label",
    "label2id", "problem_type", "output_attentions", "tie_word_embeddings",
})

MAX_CONFIG_BYTES = 16 * 2**20
# Deepest JSON nesting accepted in config.json or a safetensors header (ours need about 6).
MAX_JSON_DEPTH = 64

# Bounds of optimizer_defaults, checked before anything is built: lr multiplies the learned step
# (meta-trained at 1.0; AdamW-routed tensors get lr · mult_1d), so 1e3 is far past any useful value
# yet cannot overflow float32 for a finite step; weight_decay is decoupled (p ← p·(1 − lr·wd)), so
# wd ≤ 1 and lr·wd ≤ 1 keep the decay factor in [0, 1] (beyond it every step flips the sign of and
# blows up every parameter).
MAX_LR = 1e3
MAX_WEIGHT_DECAY = 1.0
# optimizer_defaults["chunk_size"] (elements per call of the per-element network; load_lopt passes it on):
# below 1024 a large tensor costs tens of thousands of Python-level calls per step, above 2^26 one
# call's buffers reach gigabytes. null processes each tensor whole.
CHUNK_SIZE_BOUNDS = (1024, 2**26)

# Bounds of rule hyper-parameters by name, checked (with their JSON types) before the rule is built,
# so a few bytes of config.json cannot allocate gigabytes or loop forever:
# sizes of the per-element networks, iteration counts, lengths of decay lists (each decay adds
# a parameter-sized state tensor) and the total number of meta-parameters.
HYPERPARAMETER_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "hidden_size": (1, 4096), "hidden_layers": (0, 32), "hidden_sizes": (1, 4096), "embedding_dim": (1, 4096),
    "history_length": (1, 4096), "ns_iters": (0, 100),
}
DEFAULT_INT_BOUNDS = (0, 2**20)
MAX_HYPERPARAMETER_LIST = 16
MAX_HYPERPARAMETER_STRING = 64
MAX_THETA_ELEMENTS = 2**26
# safetensors itself refuses headers above 100 MB.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 2**20

SAFETENSORS_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
SAFETENSORS_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
    "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}


class ArtifactError(ValueError):
    """A learned-optimizer artifact (or the data given to build one) is invalid.

    Attributes:
        source: the file (or call) the problem was found in.
        problems: one line per problem found.
    """

    def __init__(self, source: str, problems: str | list[str], headline: str | None = None) -> None:
        self.source = str(source)
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = f"{self.source}: {headline + ': ' if headline else ''}{self.problems[0]}"
        else:
            message = (f"{self.source}: {headline or f'{len(self.problems)} problems'}:\n"
                       + "\n".join(f"  - {problem}" for problem in self.problems))
        super().__init__(message)


# --------------------------------------------------------------------------------- config


def read_config_file(path: Path, source: str | None = None) -> dict[str, Any]:
    """Parse ``config.json`` as JSON text into a dict (not yet validated).

    Raises ``ArtifactError`` when the file is missing, too large, not UTF-8, not JSON or not a
    JSON object.
    """
    source = source or str(path)
    if not path.is_file():
        raise ArtifactError(source, f"missing file: a learned-optimizer artifact needs {CONFIG_NAME}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ArtifactError(source, f"file is {size} bytes; a {CONFIG_NAME} above {MAX_CONFIG_BYTES} bytes is "
                                    "not a learned-optimizer config")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ArtifactError(source, f"not UTF-8 text ({err})") from None
    raw = parse_json(text, source)
    if not isinstance(raw, dict):
        raise ArtifactError(source, f"must hold a JSON object, found a JSON {_json_type(raw)}")
    return _decode_special_floats(raw)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def parse_json(text: str, source: str, what: str = "") -> Any:
    """``json.loads`` that gives ``ArtifactError`` (naming ``source``) for every bad input.

    Refuses, besides invalid JSON: duplicate keys in an object (which one would win is up to the
    reader), nesting deeper than :data:`MAX_JSON_DEPTH`, and integers too long for Python to read.
    ``what`` prefixes the message (e.g. ``"the header"``).
    """
    prefix = f"{what}: " if what else ""
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise ArtifactError(source, f"{prefix}not valid JSON: {err.msg} at line {err.lineno} "
                                    f"column {err.colno}") from None
    except _DuplicateKey as err:
        raise ArtifactError(source, f"{prefix}duplicate key {err.key!r} in a JSON object") from None
    except RecursionError:
        raise ArtifactError(source, f"{prefix}JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # e.g. an integer with more digits than int() reads
        raise ArtifactError(source, f"{prefix}not valid JSON: {err}") from None
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise ArtifactError(source, f"{prefix}JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def validate_config_dict(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check a config dict (as read from ``config.json``) and return its artifact fields normalised.

    The result has exactly the keys of :data:`ARTIFACT_KEYS`; ``rule_config`` lists every
    hyper-parameter of the rule (defaults filled in). transformers' own bookkeeping keys are
    dropped. Problems are collected and raised together as one ``ArtifactError``.
    """
    return validate_config(raw, source)[0]


def validate_config(raw: Mapping[str, Any], source: str) -> tuple[dict[str, Any], UpdateRule]:
    """:func:`validate_config_dict`, also returning the rule it built to check ``rule_config``.

    A loader uses that rule for the theta check and the model, so an artifact load builds its rule once.
    """
    if not isinstance(raw, Mapping):
        raise ArtifactError(source, f"must hold a JSON object, found a JSON {_json_type(raw)}")

    model_type = raw.get("model_type")
    if model_type != MODEL_TYPE:
        found = "no model_type" if "model_type" not in raw else f"model_type {model_type!r}"
        raise ArtifactError(source, f"{found}; a learned-optimizer artifact has model_type {MODEL_TYPE!r}")

    if "format_version" not in raw:
        raise ArtifactError(source, "missing format_version (this lopt_hf reads format_version "
                                    f"1..{FORMAT_VERSION})")
    format_version = raw["format_version"]
    if not _is_int(format_version) or format_version < 1:
        raise ArtifactError(source, f"format_version must be a positive integer, found {format_version!r}")
    if format_version > FORMAT_VERSION:
        raise ArtifactError(source, f"format_version {format_version} is newer than this lopt_hf supports "
                                    f"({FORMAT_VERSION}); upgrade lopt_hf (pip install -U lopt_hf) to load it")

    if "auto_map" in raw:
        raise ArtifactError(source, "has an 'auto_map' entry (a pointer to remote code); learned-optimizer "
                                    "artifacts never ship code, so this file is refused")
    unknown = sorted(set(raw) - set(ARTIFACT_KEYS) - TRANSFORMERS_KEYS)
    if unknown:
        raise ArtifactError(source, f"unknown key(s) {unknown} for format_version {format_version}; "
                                    f"known keys: {sorted(ARTIFACT_KEYS)}")

    if "rule" not in raw:
        raise ArtifactError(source, f"missing 'rule' (the update-rule name; available: {available_rules()})")
    rule_name = raw["rule"]
    if not isinstance(rule_name, str):
        raise ArtifactError(source, f"'rule' must be a string, found {rule_name!r}")
    if rule_name not in available_rules():
        raise ArtifactError(source, f"unknown rule {rule_name!r}; available rules: {available_rules()}")

    rule_config = raw.get("rule_config")
    if rule_config is None:
        rule_config = {}
    if not isinstance(rule_config, dict):
        raise ArtifactError(source, f"'rule_config' must be a JSON object, found a JSON {_json_type(rule_config)}")
    rule = build_rule_checked(rule_name, rule_config, source)

    optimizer_defaults = raw.get("optimizer_defaults")
    optimizer_defaults = dict(DEFAULT_OPTIMIZER_DEFAULTS) if optimizer_defaults is None else optimizer_defaults
    problems = check_optimizer_defaults(optimizer_defaults)
    harness = raw.get("harness")
    if harness is not None and not isinstance(harness, dict):
        problems.append(f"'harness' must be a JSON object or null, found a JSON {_json_type(harness)}")
    elif harness:
        # Checked as load_lopt will resolve it: an invalid harness is refused here, not at the first load_lopt.
        try:
            resolve_harness(harness, source="'harness'")
        except HarnessError as err:
            problems.append(str(err))
    provenance = raw.get("provenance")
    provenance = {} if provenance is None else provenance
    if not isinstance(provenance, dict):
        problems.append(f"'provenance' must be a JSON object, found a JSON {_json_type(provenance)}")
    for key, value in (("harness", harness), ("provenance", provenance)):
        if not _is_json_value(value):
            problems.append(f"{key!r} must hold JSON values only")
    digest = provenance.get(WEIGHTS_SHA256_KEY) if isinstance(provenance, dict) else None
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(char in "0123456789abcdef" for char in digest)):
        problems.append(f"provenance[{WEIGHTS_SHA256_KEY!r}] must be the 64 lowercase hex digits of a sha256, "
                        f"found {_clip(digest)}")
    if problems:
        raise ArtifactError(source, problems)

    return {
        "rule": rule_name,
        "rule_config": rule.hyperparameters(),
        "optimizer_defaults": dict(optimizer_defaults),
        "harness": harness,
        "format_version": format_version,
        "provenance": provenance,
    }, rule


def build_rule_checked(rule_name: str, rule_config: Mapping[str, Any], source: str) -> UpdateRule:
    """``build_rule`` with every failure (unknown rule or hyper-parameter, bad value) as ArtifactError."""
    if rule_name not in available_rules():
        raise ArtifactError(source, f"unknown rule {rule_name!r}; available rules: {available_rules()}")
    problems = check_hyperparameter_values(rule_name, rule_config)
    if problems:
        raise ArtifactError(source, problems, headline=f"invalid rule_config for rule {rule_name!r}")
    try:
        rule = build_rule(rule_name, **float_hyperparameters(rule_name, rule_config))
    except Exception as err:  # the rule's own validation: RuleConfigError, ValueError, TypeError, ...
        raise ArtifactError(source, f"invalid rule_config for rule {rule_name!r}: {err}") from None
    try:
        num_theta = sum(math.prod(int(size) for size in shape) for shape in rule.theta_shapes().values())
    except Exception as err:
        raise ArtifactError(source, f"invalid rule_config for rule {rule_name!r}: {err}") from None
    if num_theta > MAX_THETA_ELEMENTS:
        raise ArtifactError(source, f"invalid rule_config for rule {rule_name!r}: {num_theta} meta-parameters, "
                                    f"more than the {MAX_THETA_ELEMENTS} a learned-optimizer artifact may have")
    return rule


def check_hyperparameter_values(rule_name: str, rule_config: Mapping[str, Any]) -> list[str]:
    """JSON types and bounds of ``rule_config``'s values, from the rule's dataclass defaults (no coercion).

    A ``bool`` hyper-parameter takes ``true`` / ``false`` only; an ``int`` one an integer (not a float,
    not a string) within :data:`HYPERPARAMETER_INT_BOUNDS` (by name; else :data:`DEFAULT_INT_BOUNDS`);
    a ``float`` one a finite number; a ``str`` one a short string; a tuple one a list of at most
    :data:`MAX_HYPERPARAMETER_LIST` such numbers (decays, ``*_decays``, in [0, 1]). Unknown names are
    left to the rule (which lists the known ones).
    """
    defaults = {field.name: field.default for field in dataclasses.fields(rule_class(rule_name))}
    problems = []
    for key, value in rule_config.items():
        if key not in defaults:
            continue
        default, label = defaults[key], f"rule_config[{key!r}]"
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                problems.append(f"{label} must be a list, found a JSON {_json_type(value)} ({_clip(value)})")
                continue
            if len(value) > MAX_HYPERPARAMETER_LIST:
                problems.append(f"{label} has {len(value)} entries; at most {MAX_HYPERPARAMETER_LIST} are allowed")
                continue
            element = default[0] if default else 0.0
            for index, item in enumerate(value):
                problem = _scalar_problem(key, item, element)
                if problem:
                    problems.append(f"{label}[{index}] {problem}")
        else:
            problem = _scalar_problem(key, value, default)
            if problem:
                problems.append(f"{label} {problem}")
    return problems


def float_hyperparameters(rule_name: str, rule_config: Mapping[str, Any]) -> dict[str, Any]:
    """``rule_config`` with the JSON integers of ``float`` hyper-parameters (and lists of them) as Python floats.

    JSON has one number type, so ``"exp_mult": 1`` means 1.0; left an ``int``, a value such as ``10**300``
    (finite as a float) reached torch as an integer too large for int64 and the first step raised
    ``OverflowError``. Call after :func:`check_hyperparameter_values` found no problem.
    """
    defaults = {field.name: field.default for field in dataclasses.fields(rule_class(rule_name))}
    converted = dict(rule_config)
    for key, value in rule_config.items():
        default = defaults.get(key)
        if isinstance(default, float) and _is_int(value):
            converted[key] = float(value)
        elif (isinstance(default, tuple) and all(isinstance(item, float) for item in default)
              and isinstance(value, (list, tuple))):
            converted[key] = [float(item) if _is_int(item) else item for item in value]
    return converted


def _scalar_problem(key: str, value: Any, default: Any) -> str | None:
    """What is wrong with ``value`` for a hyper-parameter whose default is ``default`` (None: nothing)."""
    found = f"found {_clip(value)}"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"must be true or false, {found}"
    if isinstance(default, int):
        if not _is_int(value):
            return f"must be an integer, {found}"
        low, high = HYPERPARAMETER_INT_BOUNDS.get(key, DEFAULT_INT_BOUNDS)
        return None if low <= value <= high else f"must be an integer in [{low}, {high}], {found}"
    if isinstance(default, float):
        number = _finite_float(value)
        if number is None:
            return f"must be a finite number, {found}"
        if key.endswith("decays") and not 0.0 <= number <= 1.0:
            return f"must be a decay in [0, 1], {found}"
        return None
    if isinstance(default, str):
        if not isinstance(value, str):
            return f"must be a string, {found}"
        if len(value) > MAX_HYPERPARAMETER_STRING:
            return f"is longer than {MAX_HYPERPARAMETER_STRING} characters"
        return None
    return None


def _finite_float(value: Any) -> float | None:
    """``value`` as a float if it is a real number (not a bool, not a string) and finite, else None."""
    if not _is_real(value):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range
        return None
    return number if math.isfinite(number) else None


def check_optimizer_defaults(optimizer_defaults: Any) -> list[str]:
    """Checks of ``optimizer_defaults``: a JSON object; ``lr`` in [0, :data:`MAX_LR`], ``weight_decay`` in
    [0, :data:`MAX_WEIGHT_DECAY`] (finite numbers, not strings or booleans), ``lr * weight_decay <= 1`` and
    ``chunk_size`` null or an integer within :data:`CHUNK_SIZE_BOUNDS`."""
    if not isinstance(optimizer_defaults, dict):
        return [f"'optimizer_defaults' must be a JSON object, found a JSON {_json_type(optimizer_defaults)}"]
    problems = []
    if not all(isinstance(key, str) for key in optimizer_defaults):
        problems.append("'optimizer_defaults' keys must be strings")
    if not _is_json_value(optimizer_defaults):
        problems.append("'optimizer_defaults' must hold JSON values only")
    for key, high in (("lr", MAX_LR), ("weight_decay", MAX_WEIGHT_DECAY)):
        if key in optimizer_defaults:
            value = optimizer_defaults[key]
            number = _finite_float(value)
            if number is None or not 0.0 <= number <= high:
                problems.append(f"optimizer_defaults[{key!r}] must be a finite number in [0, {high:g}], "
                                f"found {_clip(value)}")
    chunk_size = optimizer_defaults.get("chunk_size")
    low, high = CHUNK_SIZE_BOUNDS
    if chunk_size is not None and not (_is_int(chunk_size) and low <= chunk_size <= high):
        problems.append(f"optimizer_defaults['chunk_size'] must be null or an integer in [{low}, {high}], "
                        f"found {_clip(chunk_size)}")
    lr = _finite_float(optimizer_defaults.get("lr", DEFAULT_OPTIMIZER_DEFAULTS["lr"]))
    weight_decay = _finite_float(optimizer_defaults.get("weight_decay", 0.0))
    if not problems and lr is not None and weight_decay is not None and lr * weight_decay > 1.0:
        problems.append(f"optimizer_defaults: lr * weight_decay = {lr * weight_decay:g} > 1 (the decoupled decay "
                        "p * (1 - lr * weight_decay) would flip the sign of every parameter)")
    return problems


# ---------------------------------------------------------------------------------- theta


def expected_theta(rule: UpdateRule) -> dict[str, tuple[int, ...]]:
    """Name → shape of the rule's meta-parameters, shapes as plain int tuples."""
    return {name: tuple(int(size) for size in shape) for name, shape in rule.theta_shapes().items()}


def read_theta_file(path: Path, rule: UpdateRule, source: str | None = None, *,
                    expected_sha256: str | None = None) -> dict[str, Tensor]:
    """Read ``model.safetensors`` and check it holds exactly the rule's theta: float32, right shapes, finite.

    The header is parsed and checked by hand *before* the tensor data is handed to safetensors,
    so truncated or lying files give a precise message; safetensors' own errors are wrapped too.
    ``expected_sha256`` (config.json's ``provenance["weights_sha256"]``, when recorded): the file's
    bytes must have this digest. Returns the tensors in ``rule.theta_shapes()`` order.
    """
    source = source or str(path)
    if not path.is_file():
        raise ArtifactError(source, f"missing file: a learned-optimizer artifact needs {WEIGHTS_NAME} "
                                    "(weights are only ever read from safetensors, never from pickles)")
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        header_len, header = _read_safetensors_header(handle, file_size, source)
        entries = _check_header_entries(header, file_size - 8 - header_len, source)
        _check_theta_entries(entries, rule, source)
        handle.seek(0)
        data = handle.read()
    if len(data) != file_size:
        raise ArtifactError(source, "the file changed while it was being read")

    try:
        from safetensors.torch import load as load_safetensors

        tensors = load_safetensors(data)
    except Exception as err:  # SafetensorError, ValueError, ... : all mean a corrupt file
        raise ArtifactError(source, f"corrupt safetensors file: {type(err).__name__}: {err}") from None

    theta = {name: tensors[name] for name in expected_theta(rule)}
    check_theta_tensors(theta, rule, source)
    # Last, so a file that is wrong in a way the checks above name gets that precise message.
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ArtifactError(source, f"sha256 mismatch: {CONFIG_NAME} records provenance[{WEIGHTS_SHA256_KEY!r}] "
                                        f"= {expected_sha256}, but the file's sha256 is {actual} (corrupted, or "
                                        "not the weights this config was saved with)")
    return theta


def check_theta_tensors(theta: Mapping[str, Any], rule: UpdateRule, source: str,
                        *, require_float32: bool = True) -> None:
    """Check in-memory theta tensors: names, shapes, dtype (float32 unless told otherwise), finiteness."""
    expected = expected_theta(rule)
    problems = []
    for name in expected:
        if name not in theta:
            problems.append(f"missing tensor {name!r} (float32, shape {expected[name]})")
    for name in theta:
        if name not in expected:
            problems.append(f"unexpected tensor {name!r}: rule {rule.name!r} has no such meta-parameter")
    for name, value in theta.items():
        if name not in expected:
            continue
        if not isinstance(value, Tensor):
            problems.append(f"tensor {name!r} is a {type(value).__name__}, not a torch.Tensor")
            continue
        if tuple(value.shape) != expected[name]:
            problems.append(f"tensor {name!r}: shape {tuple(value.shape)}, expected {expected[name]}")
        if require_float32 and value.dtype != torch.float32:
            problems.append(f"tensor {name!r}: dtype {_torch_dtype_name(value.dtype)}, expected float32")
        elif not value.dtype.is_floating_point:
            problems.append(f"tensor {name!r}: dtype {_torch_dtype_name(value.dtype)}, expected floating point")
    if problems:
        raise ArtifactError(source, problems, headline=f"theta does not match rule {rule.name!r}")
    for name, value in theta.items():
        finite = torch.isfinite(value.detach())
        if not bool(finite.all()):
            num_nan = int(torch.isnan(value.detach()).sum())
            num_inf = int(torch.isinf(value.detach()).sum())
            problems.append(f"tensor {name!r} has {num_nan + num_inf} non-finite value(s) of {value.numel()} "
                            f"({num_nan} NaN, {num_inf} inf)")
    if problems:
        raise ArtifactError(source, problems)


def _read_safetensors_header(handle: Any, file_size: int, source: str) -> tuple[int, dict[str, Any]]:
    if file_size < 8:
        raise ArtifactError(source, f"truncated or not a safetensors file: {file_size} bytes, but a safetensors "
                                    "file starts with an 8-byte header length")
    (header_len,) = struct.unpack("<Q", handle.read(8))
    if header_len == 0 or header_len > file_size - 8:
        raise ArtifactError(source, f"truncated or not a safetensors file: the header length field says "
                                    f"{header_len} bytes, but only {file_size - 8} bytes follow it")
    if header_len > MAX_SAFETENSORS_HEADER_BYTES:
        raise ArtifactError(source, f"not a safetensors file: implausible header length {header_len} bytes")
    raw_header = handle.read(header_len)
    try:
        header_text = raw_header.decode("utf-8")
    except UnicodeDecodeError:
        raise ArtifactError(source, "corrupt or not a safetensors file: the header is not valid JSON") from None
    try:
        header = parse_json(header_text, source, "corrupt or not a safetensors file: the header")
    except ArtifactError as err:
        if "not valid JSON" in str(err):
            raise ArtifactError(source, "corrupt or not a safetensors file: the header is not valid JSON") from None
        raise
    if not isinstance(header, dict):
        raise ArtifactError(source, f"corrupt safetensors file: the header is a JSON {_json_type(header)}, "
                                    "not an object")
    return header_len, header


def _check_header_entries(header: dict[str, Any], data_len: int, source: str) -> dict[str, dict[str, Any]]:
    """Check each header entry's layout; returns name → entry (``__metadata__`` left out)."""
    entries: dict[str, dict[str, Any]] = {}
    problems = []
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        problems.append("'__metadata__' must map strings to strings")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list) and all(_is_int(s) and s >= 0 for s in entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(_is_int(o) for o in entry["data_offsets"])):
            problems.append(f"malformed header entry for tensor {name!r}: {_clip(entry)}")
            continue
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end:
            problems.append(f"tensor {name!r}: invalid data offsets [{begin}, {end}]")
        elif end > data_len:
            problems.append(f"truncated: tensor {name!r} needs bytes [{begin}, {end}) of the data section, "
                            f"which holds only {data_len} bytes")
        elif entry["dtype"] in SAFETENSORS_ITEMSIZE:
            expected_bytes = math.prod(entry["shape"]) * SAFETENSORS_ITEMSIZE[entry["dtype"]]
            if end - begin != expected_bytes:
                problems.append(f"tensor {name!r}: {end - begin} data bytes for a {entry['dtype']} tensor of "
                                f"shape {tuple(entry['shape'])}, which needs {expected_bytes}")
        entries[name] = entry
    if not problems:
        covered = sorted(tuple(entry["data_offsets"]) for entry in entries.values())
        position = 0
        for begin, end in covered:
            if begin != position:
                problems.append(f"corrupt data layout: tensors overlap or leave a gap at byte {position}")
                break
            position = end
        else:
            if position != data_len:
                problems.append(f"corrupt data layout: the tensors cover {position} bytes but the data section "
                                f"holds {data_len} (truncated header or trailing garbage)")
    if problems:
        raise ArtifactError(source, problems)
    return entries


def _check_theta_entries(entries: dict[str, dict[str, Any]], rule: UpdateRule, source: str) -> None:
    """Compare the file's tensor names / dtypes / shapes with the rule's theta (header only)."""
    expected = expected_theta(rule)
    problems = []
    for name, shape in expected.items():
        if name not in entries:
            problems.append(f"missing tensor {name!r} (float32, shape {shape})")
    for name, entry in entries.items():
        if name not in expected:
            problems.append(f"unexpected tensor {name!r} ({_st_dtype_name(entry['dtype'])}, shape "
                            f"{tuple(entry['shape'])}): rule {rule.name!r} has no such meta-parameter")
            continue
        if tuple(entry["shape"]) != expected[name]:
            problems.append(f"tensor {name!r}: shape {tuple(entry['shape'])}, expected {expected[name]}")
        if entry["dtype"] != "F32":
            problems.append(f"tensor {name!r}: dtype {_st_dtype_name(entry['dtype'])}, expected float32")
    if problems:
        raise ArtifactError(source, problems, headline=f"theta does not match rule {rule.name!r}")


# -------------------------------------------------------------------------------- helpers


def _decode_special_floats(obj: Any) -> Any:
    # transformers writes NaN / ±inf in config.json as {"__float__": "NaN"} etc.
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in ("NaN", "Infinity", "-Infinity"):
            return float({"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}[obj["__float__"]])
        return {key: _decode_special_floats(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(value) for value in obj]
    return obj


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_json_value(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json_value(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_json_value(item) for key, item in value.items())
    return False


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


def _st_dtype_name(code: str) -> str:
    name = SAFETENSORS_DTYPE_NAMES.get(code)
    return f"{name} ({code})" if name else f"unsupported dtype {code!r}"


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _clip(value: Any, limit: int = 120) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return text if len(text) <= limit else text[:limit] + "..."
