"""Prometheus metrics of the policy server, exported on kserve's `/metrics` next to its own."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from torch._dynamo.utils import counters as dynamo_counters

from vaops.models.cuda_graphs import CAPTURE_HOOKS

# Chunk operations take milliseconds (tiny preset) to tens of seconds (5B model, CPU fallback).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)

# In asynchronous execution an observe is acknowledged at once and computed with the next chunk ahead: its time
# then counts in op="act_ahead" (serving/episode.py EpisodeService.defer_observations).
OP_SECONDS = Histogram("vaops_episode_op_seconds", "Latency of one episode operation (act = one chunk; act_ahead "
                       "includes a deferred observation)", ["op", "protocol"], buckets=_BUCKETS)
SESSIONS = Gauge("vaops_sessions", "Open episode sessions")
SESSION_CAPACITY = Gauge("vaops_session_capacity", "Most sessions the server holds at once")
CACHE_BYTES = Gauge("vaops_kv_cache_bytes", "Bytes of KV cache held by open sessions")
# A SIGTERM's drain (ServeConfig.drain_timeout_s): 1 from its start, with the episodes it waits for.
DRAINING = Gauge("vaops_draining", "1 while the server lets the episodes under way finish before it stops")
EPISODES_UNDER_WAY = Gauge("vaops_episodes_under_way", "Sessions in the middle of an episode, while draining")
ERRORS = Counter("vaops_request_errors", "Requests answered with an error", ["protocol", "kind"])
# A robot's chunk waits for a compute thread when more operations are due than `--compute-threads` runs at
# once: the wait is where an overloaded server's real-time robots lose their time.
COMPUTE_THREADS = Gauge("vaops_compute_threads", "Episode operations computed at once (vaops serve --compute-threads)")
AHEAD_THREADS = Gauge("vaops_ahead_threads", "Chunks computed ahead at once on threads of their own (vaops serve "
                                              "--ahead-threads; 0: on the compute threads)")
COMPUTE_IN_FLIGHT = Gauge("vaops_compute_in_flight", "Episode operations running on the compute threads now")
COMPUTE_WAIT_SECONDS = Histogram("vaops_compute_wait_seconds", "Time an episode operation waited for a compute thread",
                                 buckets=(0.001,) + _BUCKETS)
# In asynchronous execution a robot's observation of the executing chunk waits for the chunk computed ahead (the
# robot's next): beyond its round trips, this is a robot's idle time between chunks. Above 0 on most observations,
# the GPU does not keep this many robots in real time (bench/results/serve_load_deferred_h200.md: at the paper's
# point on one H200, 7 robots' idle p99 was 0.02 s and 8 robots' 0.16-0.18 s).
AHEAD_WAIT_SECONDS = Histogram("vaops_ahead_wait_seconds", "Time an observation in asynchronous execution waited for "
                               "the chunk computed ahead (0 when it was ready)", buckets=(0.001,) + _BUCKETS)
# Robots' action steps run as one batch (vaops serve --max-batch, models/batch.py): how many batches of each size.
# Mostly size 1 while robots' chunks seldom meet; 8 robots at 50 Hz on one H200 ran sizes 1-4
# (bench/results/batched_actions_h200.md).
ACTION_BATCHES = Counter("vaops_action_batches", "Action phases run, by how many robots' shared one batch", ["size"])
# Work that stalls every robot when it happens while they are served: a CUDA graph captured (a new shape, or a
# policy's first episode: graphs are a policy's own, so a session given an unwarmed policy captures its graphs
# mid-episode; vaops serve --warm-sessions warms policies before ready) or a function compiled by torch.compile.
# Flat after warm-up on a steady server; bench/serve_load.py reports each real-time row's increase.
GRAPH_CAPTURES = Counter("vaops_cuda_graph_captures", "CUDA graphs captured since the server started")
GRAPH_CAPTURE_SECONDS = Counter("vaops_cuda_graph_capture_seconds", "Seconds spent capturing CUDA graphs (their "
                                "warm-up runs included) since the server started")
COMPILED_FRAMES = Gauge("vaops_compiled_frames", "Python frames torch.compile compiled since the server started "
                        "(compilations and recompilations)")


def _count_capture(label: str, took: float) -> None:
    GRAPH_CAPTURES.inc()
    GRAPH_CAPTURE_SECONDS.inc(took)


CAPTURE_HOOKS.append(_count_capture)
COMPILED_FRAMES.set_function(lambda: dynamo_counters["frames"]["ok"])
