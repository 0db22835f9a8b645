"""Settings of the policy server, with safe defaults: loopback only, bounded sessions and sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vaops.models.model_source import TOKEN_ENV as TOKEN_ENV

# Operations in flight on a GPU by default. One H200, robotwin preset, FP8, 8 robots through the server
# (bench/results/serve_load_threads_h200.md): 1 -> 2 -> 4 threads gave 9.53 -> 11.59 -> 11.57 chunks/s at the
# paper's operating point and 2.55 -> 3.06 -> 3.28 at the released one. Each robot's chunks are those it gets
# alone (bench/results/concurrent_chunks_h200.md: bit-identical actions).
GPU_COMPUTE_THREADS = 4
# Robots whose action steps run as one batch at most, by default on a GPU. One H200, robotwin preset, FP8, 8 robots
# at 50 Hz in asynchronous execution at the paper's point (bench/results/batched_actions_h200.md): batched, with as
# many threads for chunks ahead, each robot's idle p99 0.016-0.033 s against 0.16-0.21 s unbatched; 13.08 chunks/s
# against 11.94 without the server.
GPU_MAX_BATCH = 8


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
    # Measured on one H200 at the robotwin preset (bench/results/chunk_latency_fp8_h200.md): 0.138 -> 0.121 s a
    # chunk at the paper's operating point, 0.684 -> 0.590 s at the released one; one chunk from the same noise
    # moves 2.3% from fp32 (bf16: 1.1%).
    fp8: bool = field(default=False, metadata={
        "help": "run the transformer blocks' matrix products in FP8 (with --dtype bfloat16; a GPU of compute "
                "capability 8.9+, or a CPU for FP8's numbers, slower there than bf16; changes the numbers)"})
    max_sessions: int = 8
    max_cache_gb: float | None = field(default=None, metadata={
        "help": "memory budget for all sessions' KV caches (further bounds --max-sessions); unset: max_sessions"})
    # Sessions also stop where the device's memory does (serving/sessions.py SessionManager): a session is given a
    # new policy only while its KV cache and 25% more fit beside this reserve. None: 5% of the device's memory.
    memory_reserve_gb: float | None = field(default=None, metadata={
        "help": "GPU memory (RAM on a CPU) kept free beside the sessions, for activations and other processes "
                "(default: 5%% of the device's)"})
    idle_timeout_s: float = field(default=600.0, metadata={
        "flag": "idle_timeout", "help": "seconds after which an idle session is closed"})
    # bearer token; None: no authentication (`vaops serve --token-env`: not a flag, as a secret)
    token: str | None = field(default=None, repr=False, metadata={"flag": None})
    max_request_mb: float = 64.0
    # Episode operations (act, observe, reset) computed at once; None: GPU_COMPUTE_THREADS on a GPU, 1 on a CPU
    # (whose operations already use every core). On a GPU each session's policy runs on its own CUDA stream,
    # so operations in flight overlap there (models/policy.py Policy).
    compute_threads: int | None = field(default=None, metadata={
        "help": f"episode operations computed at once (default: {GPU_COMPUTE_THREADS} on a GPU, 1 on a CPU)"})
    # Chunks computed ahead (asynchronous execution) run on threads of their own, and on a GPU on streams of
    # lower priority than the robots' requests (models/policy.py AHEAD_PRIORITY): a request never waits for a
    # thread that other robots' chunks ahead hold (8 robots at 50 Hz on one H200, idle p99 0.23-0.24 -> 0.14-0.18 s,
    # bench/results/serve_load_ahead_h200.md). None: on a GPU as many as compute_threads, or as a batch holds robots
    # if more (thread_counts); 0 on a CPU (the compute threads run them, as the cores are shared anyway).
    ahead_threads: int | None = field(default=None, metadata={
        "help": "chunks computed ahead at once, on threads of their own (default on a GPU: --compute-threads, or "
                "--max-batch if more; 0: on the compute threads, the default on a CPU)"})
    # Asynchronous execution: an observation is acknowledged at once and computed with the next chunk ahead
    # (serving/episode.py EpisodeService.defer_observations). Closed loop on a CPU, small ALOHA policy: the same
    # actions on every seed, idle per chunk 0.27 -> 0.01 s (bench/results/async_deferred_cpu.md).
    defer_observations: bool = field(default=True, metadata={
        "help": "asynchronous execution: acknowledge an observation at once and compute it with the next chunk "
                "ahead (--no-defer-observations: before the reply)"})
    # Robots whose chunks reach their action steps together run those as one batch (models/batch.py), at most
    # this many; 1: each alone. None: GPU_MAX_BATCH on a GPU, 1 on a CPU (its cores are shared anyway). Batching
    # whole chunks lost on one H200 (8 robots: 1.4 chunks/s against 4.7 alone, serve_load_h200_batched.md, as each
    # new set of robots compiled and captured anew); the action steps alone batch with one graph a batch size.
    max_batch: int | None = field(default=None, metadata={
        "help": f"most robots whose action steps run as one batch (default: {GPU_MAX_BATCH} on a GPU, 1 on a CPU; "
                "1: each alone)"})
    # 10 ms: 8 robots on one H200 (paper's point, FP8, asynchronous) served 13.08 chunks/s against 12.49 with no
    # wait, 12.98 with 30 ms and 11.94 unbatched (bench/results/concurrent_chunks_batched_actions_h200.md).
    batch_wait_ms: float = field(default=10.0, metadata={
        "help": "how long a chunk's action steps, once the GPU has reached them, wait for other robots' to batch with"})
    # The pool's policies warmed up before ready: a robot given a policy that was not captures its CUDA graphs
    # during its first episode (one H200, paper's operating point, 2 robots: 3.93 chunks/s against 7.01 with
    # both warmed, bench/results/serve_load_warm_sessions_h200.md); each costs ~35 s of start-up and holds its
    # KV cache from the start.
    warm_sessions: int = field(default=1, metadata={
        "help": "sessions warmed up before ready (GPU, with --warmup): as many robots as this start at full "
                "speed; each holds its KV cache and graphs from the start"})
    torch_threads: int | None = None
    # On SIGTERM (a rolling update, a drained node) robots mid-episode finish before the server stops: it reports
    # not ready at once (so no new connection is routed to it), refuses new sessions and episodes (503 /
    # UNAVAILABLE: reconnect), and stops when none is under way or after this long. SIGINT (Ctrl-C) or a second
    # SIGTERM stops at once.
    drain_timeout_s: float = field(default=120.0, metadata={
        "flag": "drain_timeout", "help": "on SIGTERM, the longest wait for the episodes under way to finish, no new "
                                         "one started meanwhile (0: stop at once; SIGINT always does)"})
    # Compiled kernels (inductor's and Triton's caches) kept in this folder across restarts. A fresh node compiles
    # for minutes before the server is ready: one H200, ready 255 s after the weights were built on a fresh node,
    # 56 s with an earlier start's caches (bench/results/serve_load_batched_default_h200.md). The KServe
    # manifest mounts a volume here. None: torch's own caches (under /tmp, lost with the container).
    compile_cache: str | None = field(default=None, metadata={
        "help": "folder for compiled kernels (inductor's and Triton's caches), kept across restarts "
                "(default: torch's own, under /tmp)"})
    # On a GPU, run an episode's shapes once before reporting ready (Policy.warm_up), so the first
    # robot's first chunk does not pay for compilation and graph capture (3.9 s against 0.25 s later).
    warmup: bool = field(default=True, metadata={
        "help": "run an episode's shapes before reporting ready (GPU only; --no-warmup: ready at once)"})

    def batch_limit(self, on_gpu: bool) -> int:
        """max_batch with its default filled in."""
        return self.max_batch if self.max_batch is not None else (GPU_MAX_BATCH if on_gpu else 1)

    def thread_counts(self, on_gpu: bool) -> tuple[int, int]:
        """(compute threads, threads for chunks computed ahead) with the defaults filled in: on a GPU as many for
        chunks ahead as compute threads, or as a batch holds robots if more (the chunks ahead are most of what
        batches: bench/results/batched_actions_h200.md)."""
        compute = self.compute_threads or (GPU_COMPUTE_THREADS if on_gpu else 1)
        ahead = self.ahead_threads if self.ahead_threads is not None else (
            max(compute, self.batch_limit(on_gpu)) if on_gpu else 0)
        return compute, ahead

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    def validate(self) -> ServeConfig:
        problems = [] if self.model else ["model is required (a checkpoint folder or models:/ URI)"]
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            problems.append(f"name {self.name!r} must be letters, digits, '-' or '_'")
        for field_name in ("http_port", "grpc_port"):
            port = getattr(self, field_name)
            if not 0 < port < 65536:
                problems.append(f"{field_name} {port} is not a TCP port")
        if self.enable_grpc and self.http_port == self.grpc_port:
            problems.append(f"http_port and grpc_port are both {self.http_port}")
        if self.fp8 and self.dtype != "bfloat16":
            problems.append(f"fp8 needs --dtype bfloat16, got {self.dtype}")
        if self.max_sessions < 1:
            problems.append(f"max_sessions {self.max_sessions} must be at least 1")
        if self.max_cache_gb is not None and self.max_cache_gb <= 0:
            problems.append(f"max_cache_gb {self.max_cache_gb} must be positive")
        if self.drain_timeout_s < 0:
            problems.append(f"drain_timeout_s {self.drain_timeout_s} must not be negative")
        if self.memory_reserve_gb is not None and self.memory_reserve_gb < 0:
            problems.append(f"memory_reserve_gb {self.memory_reserve_gb} must not be negative")
        if self.idle_timeout_s <= 0:
            problems.append(f"idle_timeout_s {self.idle_timeout_s} must be positive")
        if self.max_request_mb <= 0:
            problems.append(f"max_request_mb {self.max_request_mb} must be positive")
        if self.compute_threads is not None and self.compute_threads < 1:
            problems.append(f"compute_threads {self.compute_threads} must be at least 1")
        if self.ahead_threads is not None and self.ahead_threads < 0:
            problems.append(f"ahead_threads {self.ahead_threads} must not be negative")
        if not 1 <= self.warm_sessions <= self.max_sessions:
            problems.append(f"warm_sessions {self.warm_sessions} must be between 1 and max_sessions {self.max_sessions}")
        if self.max_batch is not None and self.max_batch < 1:
            problems.append(f"max_batch {self.max_batch} must be at least 1")
        if self.batch_wait_ms < 0:
            problems.append(f"batch_wait_ms {self.batch_wait_ms} must not be negative")
        if self.token is not None and len(self.token) < 8:
            problems.append("token must be at least 8 characters")
        if problems:
            raise ValueError("invalid server settings: " + "; ".join(problems))
        return self
