"""Settings of the policy server, with safe defaults: loopback only, bounded sessions and sizes."""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_ENV = "VAOPS_SERVE_TOKEN"


@dataclass(frozen=True)
class ServeConfig:
    model: str  # a checkpoint folder, or models:/name@alias | models:/name/version
    name: str = "lingbot-va"  # the model name on the Open Inference Protocol endpoints
    host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 8081
    enable_grpc: bool = True
    device: str = "cpu"
    dtype: str = "float32"  # transformer weights: float32 | bfloat16
    max_sessions: int = 8
    max_cache_gb: float | None = None  # budget for all sessions' KV caches; None: max_sessions decides
    idle_timeout_s: float = 600.0
    token: str | None = None  # bearer token; None: no authentication
    max_request_mb: float = 64.0
    compute_threads: int = 1  # episode operations run in this many worker threads (1: one at a time)
    # Robots whose chunks are due together share their denoising passes (models/batch.py), at most this
    # many per batch; 1: each chunk alone (the default: on one H200 at the robotwin preset, 8 robots got
    # 1.4 chunks/s batched against 4.7 alone, bench/results/serve_load_h200_batched.md, as batches of changing
    # sizes compile and capture anew).
    max_batch: int = 1
    # How long the first chunk due waits for others to join its batch: robots that ask within this
    # window share one batch instead of the later ones waiting for the first's whole chunk.
    batch_wait_ms: float = 2.0
    torch_threads: int | None = None
    # On a GPU, run an episode's shapes once before reporting ready (Policy.warm_up), so the first
    # robot's first chunk does not pay for compilation and graph capture (3.9 s against 0.25 s later).
    warmup: bool = True

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    def validate(self) -> ServeConfig:
        problems = []
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            problems.append(f"name {self.name!r} must be letters, digits, '-' or '_'")
        for field_name in ("http_port", "grpc_port"):
            port = getattr(self, field_name)
            if not 0 < port < 65536:
                problems.append(f"{field_name} {port} is not a TCP port")
        if self.enable_grpc and self.http_port == self.grpc_port:
            problems.append(f"http_port and grpc_port are both {self.http_port}")
        if self.dtype not in ("float32", "bfloat16"):
            problems.append(f"dtype {self.dtype!r} must be float32 or bfloat16")
        if self.max_sessions < 1:
            problems.append(f"max_sessions {self.max_sessions} must be at least 1")
        if self.max_cache_gb is not None and self.max_cache_gb <= 0:
            problems.append(f"max_cache_gb {self.max_cache_gb} must be positive")
        if self.idle_timeout_s <= 0:
            problems.append(f"idle_timeout_s {self.idle_timeout_s} must be positive")
        if self.max_request_mb <= 0:
            problems.append(f"max_request_mb {self.max_request_mb} must be positive")
        if self.compute_threads < 1:
            problems.append(f"compute_threads {self.compute_threads} must be at least 1")
        if self.max_batch < 1:
            problems.append(f"max_batch {self.max_batch} must be at least 1")
        if self.batch_wait_ms < 0:
            problems.append(f"batch_wait_ms {self.batch_wait_ms} must not be negative")
        if self.token is not None and len(self.token) < 8:
            problems.append("token must be at least 8 characters")
        if problems:
            raise ValueError("invalid server settings: " + "; ".join(problems))
        return self
