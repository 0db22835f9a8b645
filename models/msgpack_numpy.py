"""msgpack with numpy arrays, byte-compatible with `openpi_client.msgpack_numpy`.

The upstream RoboTwin client (openpi's websocket client) packs an array as the map
`{b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str, b"shape": shape}` and a numpy
scalar as `{b"__npgeneric__": True, b"data": item, b"dtype": dtype.str}`. Decoding here is for
untrusted input: only plain numeric dtypes, a byte count that matches the shape, and bounded
sizes and nesting; anything else raises `WireError` naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

_NDARRAY = b"__ndarray__"
_NPGENERIC = b"__npgeneric__"
# bool, signed and unsigned integers, floats: nothing that numpy would build objects from.
_ALLOWED_KINDS = frozenset("biuf")


class WireError(ValueError):
    """A message that is not valid msgpack-numpy, or breaks a size limit."""


@dataclass(frozen=True)
class UnpackLimits:
    max_bytes: int = 256 * 1024 * 1024
    max_elements: int = 64 * 1024 * 1024  # elements of any one array
    max_container_len: int = 100_000  # entries of any one msgpack map or list
    max_depth: int = 16


def _pack_default(obj):
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in ("V", "O", "c"):
        raise TypeError(f"cannot send numpy dtype {obj.dtype} over the wire")
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {_NDARRAY: True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": arr.shape}
    if isinstance(obj, np.generic):
        return {_NPGENERIC: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack {type(obj).__name__}")


def packb(obj) -> bytes:
    return msgpack.packb(obj, default=_pack_default)


def _dtype(raw) -> np.dtype:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", errors="replace")
    if not isinstance(raw, str):
        raise WireError(f"array dtype must be a string, got {type(raw).__name__}")
    try:
        dtype = np.dtype(raw)
    except TypeError:
        raise WireError(f"unknown array dtype {raw!r}") from None
    if dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise WireError(f"array dtype {raw!r} is not a plain numeric type")
    return dtype


def _decode_array(obj: dict, limits: UnpackLimits) -> np.ndarray:
    dtype = _dtype(obj.get(b"dtype"))
    shape = obj.get(b"shape")
    data = obj.get(b"data")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and 0 <= d for d in shape):
        raise WireError(f"array shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(data, bytes):
        raise WireError(f"array data must be bytes, got {type(data).__name__}")
    count = 1
    for d in shape:
        count *= d
    if count > limits.max_elements:
        raise WireError(f"array of shape {tuple(shape)} exceeds {limits.max_elements} elements")
    if count * dtype.itemsize != len(data):
        raise WireError(f"array of shape {tuple(shape)} and dtype {dtype.str} needs "
                        f"{count * dtype.itemsize} bytes, got {len(data)}")
    # A copy: the message buffer is released, and the array is writable like any other.
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _decode_generic(obj: dict) -> np.generic:
    dtype = _dtype(obj.get(b"dtype"))
    value = obj.get(b"data")
    if not isinstance(value, (bool, int, float)):
        raise WireError(f"numpy scalar data must be a number, got {type(value).__name__}")
    try:
        return dtype.type(value)
    except (OverflowError, ValueError) as e:
        raise WireError(f"numpy scalar {value!r} does not fit {dtype.str}: {e}") from None


def _restore(obj, limits: UnpackLimits, depth: int):
    if depth > limits.max_depth:
        raise WireError(f"message nests deeper than {limits.max_depth} levels")
    if isinstance(obj, dict):
        if obj.get(_NDARRAY) is True:
            return _decode_array(obj, limits)
        if obj.get(_NPGENERIC) is True:
            return _decode_generic(obj)
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, bytes, int)):
                raise WireError(f"map keys must be strings, got {type(key).__name__}")
            out[key] = _restore(value, limits, depth + 1)
        return out
    if isinstance(obj, list):
        return [_restore(v, limits, depth + 1) for v in obj]
    return obj


def unpackb(data: bytes, limits: UnpackLimits = UnpackLimits()):
    """Decode one message; raises `WireError` for anything malformed or too large."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected a binary message, got {type(data).__name__}")
    if len(data) > limits.max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        raw = msgpack.unpackb(
            data, raw=False, strict_map_key=False, use_list=True,
            max_str_len=limits.max_bytes, max_bin_len=limits.max_bytes,
            max_array_len=limits.max_container_len, max_map_len=limits.max_container_len,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError,
            UnicodeDecodeError) as e:
        raise WireError(f"not a valid msgpack message ({type(e).__name__}: {e or 'malformed data'})") from None
    return _restore(raw, limits, 0)
