"""The wire codec: openpi's msgpack-numpy byte format, and refusal of hostile messages."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from vaops.models.msgpack_numpy import UnpackLimits, WireError, packb, unpackb


def openpi_pack(obj) -> bytes:
    """openpi_client.msgpack_numpy.packb, written out: the encoding the reference client sends."""
    def default(o):
        if isinstance(o, np.ndarray):
            return {b"__ndarray__": True, b"data": o.tobytes(), b"dtype": o.dtype.str, b"shape": o.shape}
        if isinstance(o, np.generic):
            return {b"__npgeneric__": True, b"data": o.item(), b"dtype": o.dtype.str}
        return o
    return msgpack.packb(obj, default=default)


def test_round_trip_matches_openpi_bytes():
    msg = {"obs": {"observation.images.cam_high": np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
                   "observation.state": np.linspace(0, 1, 14)},
           "state": np.ones((16, 2, 16), np.float32), "prompt": "stack the blocks", "n": np.int64(7),
           "compute_kv_cache": True}
    assert packb(msg) == openpi_pack(msg)
    back = unpackb(openpi_pack(msg))
    np.testing.assert_array_equal(back["obs"]["observation.images.cam_high"], msg["obs"]["observation.images.cam_high"])
    assert back["state"].dtype == np.float32 and back["state"].shape == (16, 2, 16)
    assert back["n"] == 7 and isinstance(back["n"], np.int64) and back["prompt"] == "stack the blocks"
    back["state"][0, 0, 0] = 5.0  # decoded arrays are writable copies


@pytest.mark.parametrize("dtype, error", [("|O", "not a plain numeric"), ("<U4", "not a plain numeric"),
                                          ("|V8", "not a plain numeric"), ("<c8", "not a plain numeric"),
                                          ("bogus", "unknown array dtype")])
def test_refuses_non_numeric_dtypes(dtype, error):
    raw = msgpack.packb({"a": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": dtype, b"shape": [1]}})
    with pytest.raises(WireError, match=error):
        unpackb(raw)


def test_refuses_wrong_sizes_and_deep_nesting():
    def arr(shape, data):
        return msgpack.packb({b"__ndarray__": True, b"data": data, b"dtype": "<f4", b"shape": shape})

    with pytest.raises(WireError, match=r"needs 16 bytes, got 12"):
        unpackb(arr([2, 2], b"\0" * 12))
    with pytest.raises(WireError, match="non-negative integers"):
        unpackb(arr([-1, 4], b""))
    with pytest.raises(WireError, match="exceeds 100 elements"):
        unpackb(arr([10**6, 10**6], b""), UnpackLimits(max_elements=100))
    nested = [0]
    for _ in range(40):
        nested = [nested]
    with pytest.raises(WireError, match="deeper than 16"):
        unpackb(msgpack.packb(nested))
    with pytest.raises(WireError, match="exceeds the limit of 10"):
        unpackb(b"\x91" + b"\x00" * 20, UnpackLimits(max_bytes=10))
    with pytest.raises(WireError, match="not a valid msgpack"):
        unpackb(b"\xc1\xc1")
    with pytest.raises(WireError, match="not a valid msgpack"):
        unpackb(msgpack.packb({"a": 1})[:-1])
    with pytest.raises(TypeError, match="cannot send numpy dtype object"):
        packb(np.array([object()]))
