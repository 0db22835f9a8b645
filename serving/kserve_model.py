"""The policy as a KServe model: the episode operations over the Open Inference Protocol v2.

One infer request is one operation, named by the request parameter `op`:

| op | parameters | inputs | outputs |
| --- | --- | --- | --- |
| reset | `session_id` (optional: a new id is made), `seed` (optional), `async_execution` (optional, bool or "grounded"), `operating_point` (optional: a name from the model's policy.json `operating_points`) | `prompt` BYTES [1] | - |
| act | `session_id`, `imagine` (optional) | one UINT8 [H, W, 3] per camera, named by camera key (needed at the first chunk) | `actions` FP32 [n_used, FC, N]; with `imagine`, `imagined` UINT8 [T, H, W, 3] |
| observe | `session_id` | one UINT8 [K, H, W, 3] per camera (K keyframes), `actions` FP32 [n_used, F, N] | - |
| close | `session_id` | - | - |

Every op but close takes an optional `seq` parameter, an integer increasing per session: a request
repeating the session's last `seq` is a retry and gets the first answer again, computed once (a
retry-safe reset names its `session_id`; closing a closed session succeeds). Every response carries
the parameters `session_id` and `frame_offset` (and `seq` when given). Works the same over REST
(`/v2/models/<name>/infer`) and gRPC (`ModelInfer`). With `async_execution` the server computes
each next chunk while the robot executes the current one: the observe waits for it, the next act
returns it at once.

Errors in the protocols' own terms: bad input 400 / INVALID_ARGUMENT; a request that conflicts
with the session's state or sequence numbers 409 / ABORTED; every session in use 429 with
`Retry-After` / RESOURCE_EXHAUSTED with `retry-after` trailing metadata; a failure inside the
policy 500 / INTERNAL (that episode then needs a reset).
"""

from __future__ import annotations

import logging
import uuid

import numpy as np
from fastapi.responses import JSONResponse
from grpc_interceptor.exceptions import Aborted, GrpcException, Internal, ResourceExhausted, Unavailable
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import to_http_parameters
from kserve.utils.numpy_codec import to_np_dtype

from . import metrics
from .episode import EpisodeFailed, EpisodeService, InputError
from .sessions import Conflict, Draining, SessionError, SessionsFull

log = logging.getLogger(__name__)

OPS = ("reset", "act", "observe", "close")


class ProtocolError(GrpcException):
    """An error with its gRPC status (kserve's gRPC interceptor passes GrpcException through) and its
    HTTP status (`rest_error_handler`, registered on kserve's FastAPI app)."""

    http_status = 500
    headers: dict[str, str] = {}

    def __str__(self) -> str:
        return self.details


class SessionConflict(ProtocolError, Aborted):
    http_status = 409


class CapacityExhausted(ProtocolError, ResourceExhausted):
    http_status = 429

    def __init__(self, details: str, retry_after_s: int):
        super().__init__(details)
        self.retry_after_s = retry_after_s
        self.headers = {"Retry-After": str(retry_after_s)}


class ServerDraining(ProtocolError, Unavailable):
    """The server is stopping (sessions.Draining): 503 / UNAVAILABLE, retried on a new connection."""

    http_status = 503
    headers = {"Retry-After": "1"}


class PolicyFailure(ProtocolError, Internal):
    http_status = 500


async def rest_error_handler(_, exc: ProtocolError) -> JSONResponse:
    return JSONResponse(status_code=exc.http_status, content={"error": exc.details}, headers=exc.headers)


def log_bad_input(exc: InvalidInput) -> None:
    """Bad input as one WARNING line, on REST and gRPC alike: kserve's own handlers log each at ERROR with
    its traceback, though the client erred and the server is fine."""
    log.warning("bad request: %s", exc)


async def invalid_input_handler(_, exc: InvalidInput) -> JSONResponse:
    """kserve's 400 for bad input (`log_bad_input`)."""
    log_bad_input(exc)
    return JSONResponse(status_code=400, content={"error": str(exc)})


class PolicyModel(Model):
    def __init__(self, name: str, episodes: EpisodeService):
        super().__init__(name)
        self.episodes = episodes
        self.ready = True

    def load(self) -> bool:
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        preset = self.episodes.preset
        cams = [{"name": c.key, "datatype": "UINT8", "shape": [-1, -1, 3]} for c in preset.cameras]
        n_used = len(preset.used_action_channels)
        return [{"name": "prompt", "datatype": "BYTES", "shape": [1]}, *cams,
                {"name": "actions", "datatype": "FP32", "shape": [n_used, -1, preset.action_per_frame]}]

    def get_output_types(self) -> list[dict]:
        preset = self.episodes.preset
        n_used = len(preset.used_action_channels)
        return [{"name": "actions", "datatype": "FP32",
                 "shape": [n_used, preset.frame_chunk_size, preset.action_per_frame]}]

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        protocol = "grpc" if getattr(payload, "from_grpc", False) else "rest"
        try:
            return await self._predict(payload, protocol)
        except SessionsFull as e:
            metrics.ERRORS.labels(protocol, type(e).__name__).inc()
            raise CapacityExhausted(str(e), e.retry_after_s) from None
        except Draining as e:
            metrics.ERRORS.labels(protocol, type(e).__name__).inc()
            raise ServerDraining(str(e)) from None
        except Conflict as e:
            metrics.ERRORS.labels(protocol, type(e).__name__).inc()
            raise SessionConflict(str(e)) from None
        except (InputError, SessionError) as e:
            metrics.ERRORS.labels(protocol, type(e).__name__).inc()
            raise InvalidInput(str(e)) from None
        except EpisodeFailed as e:  # the message says the episode needs a reset, which is enforced
            metrics.ERRORS.labels(protocol, "internal").inc()
            log.error("episode operation failed: %s", e, exc_info=e.__cause__)
            raise PolicyFailure(str(e)) from None
        except Exception as e:
            metrics.ERRORS.labels(protocol, "internal").inc()
            log.exception("request failed")
            raise PolicyFailure(f"internal error: {type(e).__name__}: {e}") from None

    async def _predict(self, request: InferRequest, protocol: str) -> InferResponse:
        if not isinstance(request, InferRequest):
            raise InputError("expected an Open Inference Protocol v2 request")
        params = to_http_parameters(request.parameters or {})
        op = params.get("op")
        if op not in OPS:
            raise InputError(f"parameter 'op' must be one of {list(OPS)}, got {op!r}")
        inputs = {i.name: i for i in request.inputs}
        sessions = self.episodes.sessions
        session_id = params.get("session_id")
        seq = params.get("seq")
        outputs: list[InferOutput] = []
        if op == "reset":
            prompt = _as_numpy(inputs, "prompt", "BYTES").reshape(-1)
            if prompt.size != 1:
                raise InputError(f"prompt: expected one string, got {prompt.size}")
            new = session_id is None or session_id not in sessions
            session = self.episodes.open(session_id) if new else sessions.get(session_id)
            try:
                await self.episodes.reset(session, prompt[0], params.get("seed"), protocol,
                                          params.get("async_execution", False), seq=seq,
                                          operating_point=params.get("operating_point"))
            except Exception:
                if new:
                    self.episodes.close(session.id)
                raise
        elif session_id is None:
            raise InputError(f"parameter 'session_id' is required for op {op!r} (reset returns one)")
        elif op == "close" and sessions.closed_recently(session_id):
            return self._response(request, session_id, 0, outputs, seq)  # a retried close
        elif op == "close":
            session = sessions.get(session_id)
            self.episodes.close(session.id)
        else:
            session = sessions.get(session_id)
            cams = [c.key for c in self.episodes.preset.cameras]
            if op == "act":
                present = [k for k in cams if k in inputs]
                images = {k: _as_numpy(inputs, k, "UINT8") for k in present} if present else None
                actions, imagined = await self.episodes.act(session, images, protocol,
                                                            imagine=params.get("imagine", False), seq=seq)
                outputs.append(_output("actions", actions, "FP32", request.use_binary_outputs))
                if imagined is not None:
                    outputs.append(_output("imagined", imagined, "UINT8", request.use_binary_outputs))
            else:
                executed = _as_numpy(inputs, "actions", "FP32", "FP64")
                stacks = {k: _as_numpy(inputs, k, "UINT8") for k in cams if k in inputs}
                counts = {v.shape[0] if v.ndim == 4 else -1 for v in stacks.values()}
                if len(counts) > 1 or -1 in counts:
                    raise InputError(f"camera inputs must be UINT8 [K, H, W, 3] with one K, got "
                                     f"{ {k: list(v.shape) for k, v in stacks.items()} }")
                k = counts.pop() if counts else 0
                keyframes = [{key: v[i] for key, v in stacks.items()} for i in range(k)]
                await self.episodes.observe(session, keyframes, executed, protocol, seq=seq)
        offset = session.frame_offset if session.id in sessions else 0
        return self._response(request, session.id, offset, outputs, seq)

    def _response(self, request: InferRequest, session_id: str, offset: int, outputs: list, seq) -> InferResponse:
        params = {"session_id": session_id, "frame_offset": int(offset)}
        if seq is not None:
            params["seq"] = seq
        return InferResponse(response_id=request.id or uuid.uuid4().hex, model_name=self.name,
                             infer_outputs=outputs, from_grpc=request.from_grpc, parameters=params,
                             use_binary_outputs=request.use_binary_outputs)


def _output(name: str, array: np.ndarray, datatype: str, binary: bool) -> InferOutput:
    out = InferOutput(name, list(array.shape), datatype)
    out.set_data_from_numpy(np.ascontiguousarray(array), binary_data=binary)
    return out


def _as_numpy(inputs: dict, name: str, *datatypes: str) -> np.ndarray:
    if name not in inputs:
        raise InputError(f"input {name!r} is missing")
    tensor = inputs[name]
    if tensor.datatype not in datatypes:
        raise InputError(f"input {name!r}: datatype must be {' or '.join(datatypes)}, got {tensor.datatype}")
    if getattr(tensor, "_raw_data", None) is None and tensor.datatype != "BYTES":
        # JSON numbers (REST) or typed contents (gRPC, whose uint_contents are 32-bit): kserve's
        # conversion would raise OverflowError on 300 as UINT8 and truncate 1.5 to 1.
        _check_numbers(name, tensor.datatype, tensor.data)
    try:
        return np.asarray(tensor.as_numpy())
    except (ValueError, TypeError, OverflowError) as e:
        raise InputError(f"input {name!r}: data does not match shape {tensor.shape}: {e}") from None


def _check_numbers(name: str, datatype: str, data) -> None:
    """The values fit the datatype: integers within its range for integer types, numbers within
    float32's range for FP32; named with the first value that does not."""
    try:
        values = np.asarray(data)
    except (ValueError, TypeError) as e:
        raise InputError(f"input {name!r}: data is not a flat or nested list of numbers: {e}") from None
    dtype = np.dtype(to_np_dtype(datatype))
    integral = dtype.kind in "iu"
    allowed = "iu" if integral else "iuf"
    if integral:
        info = np.iinfo(dtype)
        wanted = f"integers in [{info.min}, {info.max}]"
    else:
        wanted = "numbers"
    flat = values.reshape(-1)
    if not flat.size:
        return
    if values.dtype.kind not in allowed:  # floats for an integer type, booleans, strings, huge ints (object)
        fractional = flat[flat != np.floor(flat)] if values.dtype.kind == "f" else flat
        bad = (fractional if fractional.size else flat)[0].item() if values.dtype.kind in "bf" else next(
            (v for v in np.asarray(data, dtype=object).reshape(-1)
             if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2**63 <= v < 2**64
             or (integral and isinstance(v, float))), None)
        raise InputError(f"input {name!r}: {datatype} data must be {wanted}, got {bad!r}")
    if integral:
        low, high = flat.min(), flat.max()
        if low < info.min or high > info.max:
            bad = (low if low < info.min else high).item()
            raise InputError(f"input {name!r}: {datatype} data must be {wanted}, got {bad}")
    elif dtype == np.float32:
        limit = float(np.finfo(np.float32).max)
        big = np.abs(flat[np.isfinite(flat)]).max(initial=0.0)
        if big > limit:
            raise InputError(f"input {name!r}: FP32 values must be within ±{limit:.4g}, got {big:g}")
