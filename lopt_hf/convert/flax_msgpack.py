"""A small reader for ``flax.serialization`` msgpack files (``to_bytes`` / ``msgpack_serialize``).

Flax writes a pytree as nested msgpack maps with string keys; each array leaf is a msgpack
*extension* value whose payload is itself msgpack: ``(shape, dtype_name, raw_C_order_bytes)``.
Extension codes: 1 = ndarray, 2 = native complex, 3 = numpy scalar. Only ``msgpack`` and
``numpy`` are needed; nothing is imported from JAX/flax and nothing is unpickled or executed.

Arrays larger than flax's chunk limit are stored as ``{"__msgpack_chunked_array__": ...}``
maps; no learned-optimizer checkpoint is that large, so those are refused with a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FlaxMsgpackError", "flatten_tree", "read_flax_msgpack", "unpack_flax_msgpack"]

EXT_NDARRAY = 1
EXT_NATIVE_COMPLEX = 2
EXT_NPSCALAR = 3
CHUNKED_ARRAY_KEY = "__msgpack_chunked_array__"
# A flax checkpoint of a learned optimizer is kilobytes; refuse to parse anything absurd.
MAX_FILE_BYTES = 1 << 30
# Deepest nesting of maps / lists accepted (a Celo2 theta nests 3 deep; flax optimizer states a few more).
MAX_TREE_DEPTH = 64

_DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
}


class FlaxMsgpackError(ValueError):
    """The bytes are not a flax msgpack checkpoint this reader understands.

    Attributes:
        source: the file (or label) read.
        reason: what is wrong, without the source.
    """

    def __init__(self, source: str, reason: str) -> None:
        self.source, self.reason = str(source), reason
        super().__init__(f"{self.source}: {reason}")


def _decode_array(payload: bytes, source: str) -> np.ndarray:
    import msgpack

    try:
        shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
    except Exception as err:  # malformed payload: any msgpack error or a wrong tuple length
        raise FlaxMsgpackError(source, f"corrupt array payload ({type(err).__name__}: {err})") from None
    if isinstance(dtype_name, bytes):
        dtype_name = dtype_name.decode("ascii", "replace")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise FlaxMsgpackError(source, f"array payload has an invalid shape {shape!r}")
    if not isinstance(buffer, (bytes, bytearray)):
        raise FlaxMsgpackError(source, "array payload has no raw data")
    if dtype_name == "bfloat16":
        count = int(np.prod(shape, dtype=np.int64))
        if len(buffer) != 2 * count:
            raise FlaxMsgpackError(source, f"bfloat16 array of shape {tuple(shape)} needs {2 * count} bytes, "
                                   f"found {len(buffer)}")
        # bfloat16 is the upper half of a float32: widen exactly.
        halves = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    if dtype_name not in _DTYPES:
        raise FlaxMsgpackError(source, f"unsupported array dtype {dtype_name!r}")
    dtype = np.dtype(_DTYPES[dtype_name]).newbyteorder("<")  # flax writes native (x86/arm: little) order
    count = int(np.prod(shape, dtype=np.int64))
    if len(buffer) != count * dtype.itemsize:
        raise FlaxMsgpackError(source, f"{dtype_name} array of shape {tuple(shape)} needs "
                               f"{count * dtype.itemsize} bytes, found {len(buffer)}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def unpack_flax_msgpack(data: bytes, source: str = "<bytes>") -> dict[str, Any]:
    """Decode flax msgpack bytes into nested dicts whose leaves are numpy arrays (or plain values)."""
    import msgpack

    def ext_hook(code: int, payload: bytes) -> Any:
        if code == EXT_NDARRAY:
            return _decode_array(payload, source)
        if code == EXT_NPSCALAR:
            return _decode_array(payload, source).reshape(())
        if code == EXT_NATIVE_COMPLEX:
            raise FlaxMsgpackError(source, "complex numbers are not supported")
        raise FlaxMsgpackError(source, f"unknown msgpack extension type {code}")

    try:
        tree = msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except FlaxMsgpackError:
        raise
    except Exception as err:  # ExtraData, FormatError, StackError, UnicodeDecodeError, ValueError ...
        raise FlaxMsgpackError(source, f"not a msgpack file ({type(err).__name__}: {err})") from None
    if not isinstance(tree, dict):
        raise FlaxMsgpackError(source, f"a flax checkpoint holds a msgpack map at the top, found "
                               f"{type(tree).__name__}")
    if _nesting_depth(tree) > MAX_TREE_DEPTH:  # before anything walks the tree recursively
        raise FlaxMsgpackError(source, f"maps or arrays nested deeper than {MAX_TREE_DEPTH} levels; not a "
                               "learned-optimizer checkpoint")
    _refuse_chunked(tree, source)
    return tree


def _nesting_depth(tree: Any) -> int:
    """How deep maps and lists nest in ``tree`` (without recursion; stops counting past MAX_TREE_DEPTH)."""
    deepest, pending = 0, [(tree, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, (dict, list, tuple)):
            deepest = max(deepest, depth)
            if depth > MAX_TREE_DEPTH:
                return depth
            pending.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def read_flax_msgpack(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a flax msgpack file (e.g. a ``theta.state``) into nested dicts of numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FlaxMsgpackError(path, "no such file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise FlaxMsgpackError(path, f"{size} bytes is far too large for a learned-optimizer checkpoint")
    return unpack_flax_msgpack(path.read_bytes(), str(path))


def flatten_tree(tree: Mapping[str, Any], separator: str = "/") -> dict[str, Any]:
    """``{"a": {"b": x}}`` → ``{"a/b": x}`` (leaves are anything that is not a mapping)."""
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{separator}{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                walk(value, name)
            else:
                flat[name] = value

    walk(tree, "")
    return flat


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A writable torch copy of a decoded array."""
    return torch.from_numpy(np.array(array, copy=True))


def _refuse_chunked(node: Any, source: str) -> None:
    if isinstance(node, dict):
        if CHUNKED_ARRAY_KEY in node:
            raise FlaxMsgpackError(source, "holds a chunked (>1 GiB) array, which this reader does not support")
        for value in node.values():
            _refuse_chunked(value, source)
