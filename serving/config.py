"""Settings of the policy server, with safe defaults: loopback only, bounded sessions and sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vaops.models.model_source import TOKEN_ENV as TOKEN_ENV

# What each numeric setting must be (an unset one, None, is not checked), in the order they are reported.
_BOUNDS = {"max_sessions": "be at least 1", "max_cache_gb": "be positive", "idle_timeout_s": "be positive",
           "max_request_mb": "be positive", "compute_threads": "be at least 1", "max_batch": "be at least 1",
           "batch_wait_ms": "not be negative"}
_BROKEN = {"be at least 1": lambda v: v < 1, "be positive": lambda v: v <= 0, "not be negative": lambda v: v < 0}


@dataclass(frozen=True)
class ServeConfig:
    model: str = field(default="", metadata={
        "help": "checkpoint folder, or models:/<name>@<alias> | models:/<name>/<version> from the registry"})
    name: str = field(default="lingbot-va", metadata={"help": "model name on the /v2/models/<name> endpoints"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "interface to bind (default loopback only; 0.0.0.0 inside a container)"})
    http_port: int = field(default=8080, metadata={"help": "REST, websocket and metrics port"})
    grpc_port: int = 8081
    enable_grpc: bool = field(default=True, metadata={"flag": "grpc", "help": "serve gRPC (--no-grpc: REST and "
                                                                               "websocket only)"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    dtype: Literal["float32", "bfloat16"] = "float32"  # transformer weights
    max_sessions: int = 8
    max_cache_gb: float | None = field(default=None, metadata={
        "help": "memory budget for all sessions' KV caches (further bounds --max-sessions); unset: max_sessions"})
    idle_timeout_s: float = field(default=600.0, metadata={
        "flag": "idle_timeout", "help": "seconds after which an idle session is closed"})
    # bearer token; None: no authentication (`vaops serve --token-env`: not a flag, as a secret)
    token: str | None = field(default=None, repr=False, metadata={"flag": None})
    max_request_mb: float = 64.0
    compute_threads: int = field(default=1, metadata={"help": "episode operations computed at once (1 suits one GPU)"})
    # Robots whose chunks are due together share their denoising passes (models/batch.py), at most this
    # many per batch; 1: each chunk alone (the default: on one H200 at the robotwin preset, 8 robots got
    # 1.4 chunks/s batched against 4.7 alone, bench/results/serve_load_h200_batched.md, as batches of changing
    # sizes compile and capture anew).
    max_batch: int = field(default=1, metadata={"help": "most robots whose chunks run as one batch (1: each alone)"})
    batch_wait_ms: float = field(default=2.0, metadata={
        "help": "how long a chunk waits for other robots' chunks to batch with: robots that ask within it share "
                "one batch instead of the later ones waiting for the first's whole chunk"})
    torch_threads: int | None = None
    # On a GPU, run an episode's shapes once before reporting ready (Policy.warm_up), so the first
    # robot's first chunk does not pay for compilation and graph capture (3.9 s against 0.25 s later).
    warmup: bool = field(default=True, metadata={
        "help": "run an episode's shapes before reporting ready (GPU only; --no-warmup: ready at once)"})

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    def validate(self) -> ServeConfig:
        problems = [] if self.model else ["model is required (a checkpoint folder or models:/ URI)"]
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            problems.append(f"name {self.name!r} must be letters, digits, '-' or '_'")
        problems += [f"{name} {port} is not a TCP port" for name in ("http_port", "grpc_port")
                     if not 0 < (port := getattr(self, name)) < 65536]
        if self.enable_grpc and self.http_port == self.grpc_port:
            problems.append(f"http_port and grpc_port are both {self.http_port}")
        problems += [f"{name} {value} must {bound}" for name, bound in _BOUNDS.items()
                     if (value := getattr(self, name)) is not None and _BROKEN[bound](value)]
        if self.token is not None and len(self.token) < 8:
            problems.append("token must be at least 8 characters")
        if problems:
            raise ValueError("invalid server settings: " + "; ".join(problems))
        return self
