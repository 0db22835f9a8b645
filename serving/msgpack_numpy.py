"""The wire codec lives in `vaops.models.msgpack_numpy` (the evaluation client and the server share
it). Re-exported here only for bench/serve.py and bench/production_path.py; delete this module once
they import `vaops.models.msgpack_numpy`."""

from vaops.models.msgpack_numpy import UnpackLimits, WireError, packb, unpackb

__all__ = ["UnpackLimits", "WireError", "packb", "unpackb"]
