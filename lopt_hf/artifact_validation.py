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

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .rules import UpdateRule, available_rules, build_rule

FORMAT_VERSION = 1
"""The artifact format this version of lopt_hf writes and the newest it can read."""

MODEL_TYPE = "learned_optimizer"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"

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
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ArtifactError(source, f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(source, f"must hold a JSON object, found a JSON {_json_type(raw)}")
    return _decode_special_floats(raw)


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
    provenance = raw.get("provenance")
    provenance = {} if provenance is None else provenance
    if not isinstance(provenance, dict):
        problems.append(f"'provenance' must be a JSON object, found a JSON {_json_type(provenance)}")
    for key, value in (("harness", harness), ("provenance", provenance)):
        if not _is_json_value(value):
            problems.append(f"{key!r} must hold JSON values only")
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
    try:
        return build_rule(rule_name, **dict(rule_config))
    except Exception as err:  # the rule's own validation: RuleConfigError, ValueError, TypeError, ...
        raise ArtifactError(source, f"invalid rule_config for rule {rule_name!r}: {err}") from None


def check_optimizer_defaults(optimizer_defaults: Any) -> list[str]:
    """Light checks of ``optimizer_defaults``: a JSON object; lr / weight_decay finite and >= 0."""
    if not isinstance(optimizer_defaults, dict):
        return [f"'optimizer_defaults' must be a JSON object, found a JSON {_json_type(optimizer_defaults)}"]
    problems = []
    if not all(isinstance(key, str) for key in optimizer_defaults):
        problems.append("'optimizer_defaults' keys must be strings")
    if not _is_json_value(optimizer_defaults):
        problems.append("'optimizer_defaults' must hold JSON values only")
    for key in ("lr", "weight_decay"):
        if key in optimizer_defaults:
            value = optimizer_defaults[key]
            if not _is_real(value) or not math.isfinite(value) or value < 0:
                problems.append(f"optimizer_defaults[{key!r}] must be a finite number >= 0, found {value!r}")
    return problems


# ---------------------------------------------------------------------------------- theta


def expected_theta(rule: UpdateRule) -> dict[str, tuple[int, ...]]:
    """Name → shape of the rule's meta-parameters, shapes as plain int tuples."""
    return {name: tuple(int(size) for size in shape) for name, shape in rule.theta_shapes().items()}


def read_theta_file(path: Path, rule: UpdateRule, source: str | None = None) -> dict[str, Tensor]:
    """Read ``model.safetensors`` and check it holds exactly the rule's theta: float32, right shapes, finite.

    The header is parsed and checked by hand *before* the tensor data is handed to safetensors,
    so truncated or lying files give a precise message; safetensors' own errors are wrapped too.
    Returns the tensors in ``rule.theta_shapes()`` order.
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
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ArtifactError(source, "corrupt or not a safetensors file: the header is not valid JSON") from None
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
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
