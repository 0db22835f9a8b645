"""The policy server: KServe's ModelServer (REST + gRPC Open Inference Protocol) with the upstream
websocket protocol as a route on the same FastAPI app.

What this adds to a stock ModelServer:
- it binds the configured host (kserve binds every interface; here loopback unless told otherwise);
- an optional bearer token on every route except health, readiness and metrics, by one rule on
  REST, websocket and gRPC (server and model metadata need it), and a request size limit on all three;
- kserve's model repository extension (load/unload over REST and gRPC) is switched off, and the
  server metadata no longer advertises it;
- errors in each protocol's terms: 409 / ABORTED for conflicts, 429 with Retry-After /
  RESOURCE_EXHAUSTED with `retry-after` trailing metadata when every session is in use;
- upstream's health route, `GET /healthz` -> 200 `OK`, on the websocket's port;
- idle sessions are swept every second, so their caches are freed without waiting for a request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import torch
from grpc import aio
from kserve import ModelServer
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.errors import InvalidInput, ModelNotReady, ServerNotReady
from fastapi.responses import JSONResponse, PlainTextResponse
from kserve.model_server import app as kserve_app  # the FastAPI app kserve's REST server serves
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.server import RESTServer

from vaops.models.batch import ChunkBatcher
from vaops.models.checkpoint import load_weights
from vaops.models.model_source import resolve_checkpoint
from vaops.models.msgpack_numpy import UnpackLimits
from vaops.models.policy import PolicyWeights, allow_concurrent_policies

from . import metrics
from .config import ServeConfig
from .episode import EpisodeService
from .kserve_model import (CapacityExhausted, PolicyModel, ProtocolError, invalid_input_handler, log_bad_input,
                           rest_error_handler)
from .sessions import SessionManager
from .websocket import EpisodeSocket

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Probes and scrapers carry no token: health, readiness and metrics answer without one (HTTP GET
# only, never the websocket); metadata, like inference, needs it on every protocol.
_OPEN_GRPC_METHODS = ("ServerLive", "ServerReady", "ModelReady")
# kserve's model repository extension would let any client unload the served model: switched off.
_REPOSITORY_HTTP_PREFIX = "/v2/repository/"
_REPOSITORY_GRPC_METHODS = ("RepositoryModelLoad", "RepositoryModelUnload")


def _token_ok(header: bytes | str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, or `Api-Key <token>` as openpi's websocket client sends it."""
    if not header:
        return False
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, value = header.partition(" ")
    return scheme.lower() in ("bearer", "api-key") and hmac.compare_digest(value.strip(), token)


class GuardMiddleware:
    """ASGI middleware: bearer token and request body limit (HTTP), token on websocket handshakes,
    no model repository operations."""

    def __init__(self, app, token: str | None, max_bytes: int, open_paths: frozenset[str]):
        self.app = app
        self.token = token
        self.max_bytes = max_bytes
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["path"].startswith(_REPOSITORY_HTTP_PREFIX):
            if kind == "websocket":
                await receive()
                return await send({"type": "websocket.close", "code": 1008})
            return await _send_json(send, 403, {"error": "model repository operations are disabled on this server"})
        open_path = kind == "http" and scope["path"] in self.open_paths
        if self.token and not open_path:
            header = dict(scope["headers"]).get(b"authorization")
            if not _token_ok(header, self.token):
                if kind == "websocket":
                    await receive()  # the websocket.connect event
                    return await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
                return await _send_json(send, 401, {"error": "missing or wrong bearer token"},
                                        [(b"www-authenticate", b"Bearer")])
        if kind == "websocket":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, {"error": f"request body over the {self.max_bytes} byte limit"})
        # Read the body up to the limit before the app sees it, so an oversized chunked upload is
        # refused before anything is decoded.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_json(send, 413, {"error": f"request body over the {self.max_bytes} byte limit"})
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class GuardInterceptor(aio.ServerInterceptor):
    """gRPC: no model repository operations; the bearer token on everything but health (if set)."""

    def __init__(self, token: str | None):
        self.token = token

    async def intercept_service(self, continuation, details):
        method = details.method.rsplit("/", 1)[-1]
        if method in _REPOSITORY_GRPC_METHODS:
            return _deny(grpc.StatusCode.PERMISSION_DENIED, "model repository operations are disabled on this server")
        if self.token is None or method in _OPEN_GRPC_METHODS:
            return await continuation(details)
        if _token_ok(dict(details.invocation_metadata or ()).get("authorization"), self.token):
            return await continuation(details)
        return _deny(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


class PolicyExceptionInterceptor(ExceptionToStatusInterceptor):
    """kserve's mapping of exceptions to gRPC status, plus the retry hint of a full session table and bad input
    logged as one warning line."""

    async def handle_exception(self, ex, request_or_iterator, context, method_name):
        if isinstance(ex, CapacityExhausted):
            await context.abort(ex.status_code, ex.details, trailing_metadata=(("retry-after", str(ex.retry_after_s)),))
        if isinstance(ex, InvalidInput):
            log_bad_input(ex)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, ex.reason)
        await super().handle_exception(ex, request_or_iterator, context, method_name)


class PolicyDataPlane(DataPlane):
    """kserve's data plane; the server metadata lists no extensions (the model repository one is off). While the
    server drains (`draining`) its readiness routes answer not ready, so no new traffic is routed to it, and its
    requests are still served: kserve's inference routes ask `model_ready(name, True)`, its probes without."""

    draining = False

    def metadata(self) -> dict:
        return {**super().metadata(), "extensions": []}

    async def ready(self) -> bool:
        return not self.draining and await super().ready()

    async def model_ready(self, model_name: str, disable_predictor_health_check: bool = False) -> bool:
        ready = await super().model_ready(model_name, disable_predictor_health_check)
        return ready and (disable_predictor_health_check or not self.draining)


async def not_ready_handler(_, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=503, content={"error": str(exc)})


async def healthz() -> PlainTextResponse:
    """Upstream's (openpi) websocket server answers this on its port; load balancers probe it."""
    return PlainTextResponse("OK\n")


def _deny(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def deny(request, context):
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(deny)


class BoundGRPCServer(GRPCServer):
    """kserve's gRPC server listens on [::]; this one on the configured host, with the token check."""

    def __init__(self, host: str, port: int, data_plane, repository, max_bytes: int, token: str | None):
        super().__init__(port, data_plane, repository, kwargs={})
        self._host = host
        self._max_bytes = max_bytes
        self._token = token

    async def start(self, max_workers):
        interceptors = [GuardInterceptor(self._token), LoggingInterceptor(), PolicyExceptionInterceptor()]
        self._server = aio.server(
            ThreadPoolExecutor(max_workers=max_workers), interceptors=interceptors,
            options=[("grpc.max_receive_message_length", self._max_bytes),
                     ("grpc.max_send_message_length", self._max_bytes)])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self._data_plane, self._model_repository_extension), self._server)
        host = f"[{self._host}]" if ":" in self._host else self._host
        if self._server.add_insecure_port(f"{host}:{self._port}") == 0:
            raise OSError(f"cannot listen for gRPC on {host}:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()


class PolicyRESTServer(RESTServer):
    """kserve's REST server with the policy's error answers. kserve adds its own handlers when the server
    starts, so ours go in after them: ProtocolError's status and headers (429 with Retry-After, 409),
    and bad input as one WARNING line rather than kserve's ERROR with a traceback."""

    def _add_exception_handlers(self, app) -> None:
        super()._add_exception_handlers(app)
        app.add_exception_handler(ProtocolError, rest_error_handler)
        app.add_exception_handler(InvalidInput, invalid_input_handler)
        for not_ready in (ModelNotReady, ServerNotReady):  # probes while draining: a 503 each, not a traceback each
            app.add_exception_handler(not_ready, not_ready_handler)


class PolicyServer(ModelServer):
    def __init__(self, config: ServeConfig):
        super().__init__(http_port=config.http_port, grpc_port=config.grpc_port, workers=1,
                         enable_grpc=config.enable_grpc, enable_docs_url=False, enable_latency_logging=False)
        self.dataplane = PolicyDataPlane(model_registry=self.registered_models)
        self.config = config

    def start(self, models: list[PolicyModel]) -> None:
        cfg = self.config
        self._register_and_check_atleast_one_model_is_ready(models)
        model = models[0]
        self._rest_server = PolicyRESTServer(FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
                                       cfg.http_port, workers=1, event_loop="asyncio")
        self._rest_server.config.host = cfg.host
        self._rest_server.config.ws_max_size = cfg.max_request_bytes
        # Liveness ("/" and /healthz too), readiness (v1's model status is its readiness) and metrics.
        open_paths = frozenset({"/", "/healthz", "/metrics", "/v2/health/live", "/v2/health/ready",
                                f"/v2/models/{cfg.name}/ready", f"/v1/models/{cfg.name}"})
        kserve_app.add_middleware(GuardMiddleware, token=cfg.token, max_bytes=cfg.max_request_bytes, open_paths=open_paths)
        kserve_app.add_api_route("/healthz", healthz, methods=["GET"])
        limits = UnpackLimits(max_bytes=cfg.max_request_bytes)
        kserve_app.add_api_websocket_route("/", EpisodeSocket(cfg.name, model.episodes, limits))
        self._drain_on_signal()
        self.servers.append(self._rest_server.start())
        if cfg.enable_grpc:
            self._grpc_server = BoundGRPCServer(cfg.host, cfg.grpc_port, self.dataplane,
                                                self.model_repository_extension, cfg.max_request_bytes, cfg.token)
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.servers.append(self._sweep_idle(model.episodes))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())

    def _drain_on_signal(self) -> None:
        """Wrap uvicorn's signal handler (it replaces kserve's while serving): a first SIGTERM (Kubernetes' stop) is
        noted for `_sweep_idle`, which drains (ServeConfig.drain_timeout_s) and then stops; SIGINT (Ctrl-C, a
        local tool stopping its own server) or a second SIGTERM stops at once."""
        server = self._rest_server._server
        stop = server.handle_exit
        self._signalled: tuple | None = None

        def handle_exit(sig, frame) -> None:
            if sig == signal.SIGTERM and self._signalled is None:
                self._signalled = (sig, frame, stop)
            else:
                stop(sig, frame)

        server.handle_exit = handle_exit

    async def _sweep_idle(self, episodes: EpisodeService) -> None:
        uvicorn_server = self._rest_server._server
        sessions = episodes.sessions
        deadline = None
        while not uvicorn_server.should_exit:
            await asyncio.sleep(0.25 if self._signalled else 1.0)
            if sessions.expire_idle():
                episodes.update_gauges()
            if self._signalled is None:
                continue
            sig, frame, stop = self._signalled
            under_way = sessions.episodes_under_way()
            metrics.EPISODES_UNDER_WAY.set(under_way)
            if deadline is None and under_way and self.config.drain_timeout_s > 0:
                deadline = time.monotonic() + self.config.drain_timeout_s
                sessions.draining = self.dataplane.draining = True  # readiness probes now fail: no new traffic
                metrics.DRAINING.set(1)
                log.info("stopping: %d episode(s) under way may finish within %g s; no new session or episode "
                         "meanwhile (SIGINT or another SIGTERM stops now)", under_way, self.config.drain_timeout_s)
            if not under_way or deadline is None or time.monotonic() > deadline:
                if deadline is not None:
                    log.info("stopping: %s", "the episodes under way have ended" if not under_way else
                             f"{under_way} episode(s) still under way after {self.config.drain_timeout_s:g} s")
                stop(sig, frame)
        # REST is down (a signal, or its port was taken): take gRPC down too, so the process ends.
        if self._grpc_server is not None:
            await self._grpc_server.stop()


def use_compile_cache(folder: str | None) -> None:
    """Keep inductor's and Triton's compiled kernels in `folder` (before anything compiles): a restart on another
    node, or in a new container, then loads them instead of compiling again (ServeConfig.compile_cache)."""
    if folder is None:
        return
    caches = {"TORCHINDUCTOR_CACHE_DIR": Path(folder, "inductor"), "TRITON_CACHE_DIR": Path(folder, "triton")}
    for path in caches.values():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"compile_cache {folder}: cannot create {path}: {e.strerror}") from None
    os.environ.update({name: str(path.resolve()) for name, path in caches.items()})


def build_model(cfg: ServeConfig) -> PolicyModel:
    """Load the checkpoint once and wrap it as the KServe model (sessions share its weights)."""
    use_compile_cache(cfg.compile_cache)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    folder = resolve_checkpoint(cfg.model)
    log.info("loading %s (%s) on %s as %s", cfg.model, folder, cfg.device, cfg.dtype)
    with out_of_memory_as_error(cfg, "loading the weights", half_precision_flag(cfg)):
        weights = load_weights(folder, device=cfg.device, dtype=DTYPES[cfg.dtype])
    return model_from_weights(cfg, weights)


def half_precision_flag(cfg: ServeConfig) -> list[str]:
    """The flag that halves the weights' and caches' memory, where they are float32."""
    return ["--dtype bfloat16"] if cfg.dtype == "float32" else []


@contextmanager
def out_of_memory_as_error(cfg: ServeConfig, stage: str, fixes: list[str]):
    """The device's memory running out while the server starts (the weights, the sessions made before ready) as
    one line naming the device, the stage and `fixes`, the flags that would take less of it at this stage (a
    ValueError: `vaops serve` exits 2), not torch's traceback. Past start-up, sessions are bounded by the memory
    left (serving/sessions.py)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        # a CPU allocation failing is a RuntimeError from torch's CPU allocator
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        free = "free memory on the device (other processes may hold it) or serve on a larger one"
        advice = f"serve with {' '.join(fixes)}, or {free}" if fixes else free
        raise ValueError(f"{cfg.device}: out of memory while {stage} ({str(e).splitlines()[0]}); {advice}") from None


def model_from_weights(cfg: ServeConfig, weights: PolicyWeights) -> PolicyModel:
    if cfg.fp8:
        with out_of_memory_as_error(cfg, "quantising the weights to FP8", []):
            swapped = weights.use_fp8()
        log.info("FP8 block GEMMs: %s", f"{swapped} Linears quantised" if swapped else "the weights came quantised")
        if not weights.on_gpu:
            log.warning("FP8 on a CPU runs oneDNN's FP8 products: FP8's numbers, slower than bfloat16 "
                        "(PolicyWeights.use_fp8)")
    max_cache = None if cfg.max_cache_gb is None else int(cfg.max_cache_gb * 2**30)
    batch = cfg.batch_limit(weights.on_gpu)
    if batch > 1:  # before the first policy is made: every session's engine joins the batcher
        weights.batcher = ChunkBatcher(max_batch=batch, gather_s=cfg.batch_wait_ms / 1e3,
                                       on_batch=lambda n: metrics.ACTION_BATCHES.labels(size=str(n)).inc())
    reserve = None if cfg.memory_reserve_gb is None else int(cfg.memory_reserve_gb * 2**30)
    fixes = [*(["--warm-sessions 1"] if cfg.warm_sessions > 1 and weights.on_gpu else []),
             *(["--fp8"] if not cfg.fp8 else []),
             *half_precision_flag(cfg)]
    with out_of_memory_as_error(cfg, "making the sessions ready before serving (their KV caches, and their "
                                     "warm-up on a GPU)", fixes):
        sessions = SessionManager(weights, cfg.max_sessions, max_cache, cfg.idle_timeout_s,
                                  warm_up=cfg.warmup and weights.on_gpu, warm_sessions=cfg.warm_sessions,
                                  memory_reserve_bytes=reserve)
    threads, ahead_threads = cfg.thread_counts(weights.on_gpu)
    if threads + ahead_threads > 1:
        allow_concurrent_policies()
    metrics.COMPUTE_THREADS.set(threads)
    metrics.AHEAD_THREADS.set(ahead_threads)
    episodes = EpisodeService(sessions, *started_pools(threads, ahead_threads, weights.device))
    episodes.defer_observations = cfg.defer_observations
    return PolicyModel(cfg.name, episodes)


def started_pools(threads: int, ahead_threads: int, device: torch.device
                  ) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor | None]:
    """The compute threads and, where `ahead_threads` > 0, the threads of chunks computed ahead (else None:
    the compute threads run those), each pool started (`started_threads`)."""
    compute = started_threads(threads, device)
    return compute, started_threads(ahead_threads, device, "ahead") if ahead_threads else None


def started_threads(threads: int, device: torch.device, name: str = "policy") -> ThreadPoolExecutor:
    """The compute threads, all started before the server reports ready, each past its first matrix product
    and convolution on `device`: a thread gets its own cuBLAS and cuDNN handles at its first call, and with
    several threads a robot's first operations would each meet a thread that has not made them yet."""
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
    together = threading.Barrier(threads)  # one task a thread: each holds its thread until all have one

    def first_calls() -> None:
        together.wait()
        x = torch.ones(1, 2, 2, 4, 4, device=device)
        torch.nn.functional.conv3d(x, x[:, :, :1, :2, :2])
        _ = x[0, 0, 0] @ x[0, 0, 0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for started in [executor.submit(first_calls) for _ in range(threads)]:
        started.result()
    return executor


def serve(cfg: ServeConfig, model: PolicyModel | None = None) -> None:
    """Serve until SIGINT/SIGTERM; `model` defaults to loading `cfg.model`."""
    cfg.validate()
    model = model or build_model(cfg)
    log.info("serving %s on http://%s:%d (websocket at /)%s; %d sessions of %.1f MiB cache each",
             cfg.name, cfg.host, cfg.http_port,
             f", gRPC on {cfg.host}:{cfg.grpc_port}" if cfg.enable_grpc else "",
             model.episodes.sessions.capacity, model.episodes.sessions.bytes_per_session / 2**20)
    PolicyServer(cfg).start([model])
