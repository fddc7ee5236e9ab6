"""The wire format of openpi's policy protocol: msgpack with numpy arrays, so `openpi-client` works
unchanged against our server.

An array travels as the map {b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape":
shape}, a numpy scalar as {b"__npgeneric__": True, b"data": value, b"dtype": dtype.str} (bytes keys, as
openpi-client writes them). Object, void and complex arrays are refused: msgpack must never carry a
pickle.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_UNSUPPORTED_KINDS = ("V", "O", "c")


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _UNSUPPORTED_KINDS:
        raise TypeError(f"cannot send an array of dtype {obj.dtype}: expected numbers or booleans")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send an object of type {type(obj).__name__}")


def _unpack_hook(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind in _UNSUPPORTED_KINDS:
            raise ValueError(f"refusing an array of dtype {dtype}: expected numbers or booleans")
        return np.frombuffer(obj[b"data"], dtype=dtype).reshape(obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def packb(obj: Any) -> bytes:
    """Serialize a (nested) dict / list of numbers, strings, numpy arrays and scalars."""
    return msgpack.packb(obj, default=_pack_default)


def unpackb(data: bytes) -> Any:
    """The inverse of `packb` (and of openpi-client's packer). Arrays are read-only views of `data`."""
    return msgpack.unpackb(data, object_hook=_unpack_hook)
