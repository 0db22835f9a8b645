"""Replay a fixed-shape computation as one CUDA graph.

Each denoising step runs ~20 kernels per block; for the small action chunks the GPU finishes them
faster than Python can launch them, so the steps are captured once and replayed.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import Counter
from typing import Callable

import torch

# One capture at a time in the process: entering a capture synchronises the device (and frees cached
# blocks), which fails while another thread's stream is capturing ("operation not permitted when stream
# is capturing"), as happens when several sessions' threads meet new shapes at once (models/batch.py).
_CAPTURE_LOCK = threading.Lock()
# Called after each capture with its label (what fixes its shapes) and seconds (warm-up runs included): a capture
# while robots are served stalls them all (it holds the lock above and synchronises the device), so the server
# counts them (serving/metrics.py) and bench/serve_load.py lists the ones inside each timed row.
CAPTURE_HOOKS: list[Callable[[str, float], None]] = []


# torch hands its streams out round-robin from a pool of 32 a device (`torch.cuda.Stream()`), so two live
# policies may get the same one. They are then ordered on the GPU anyway, but must not run at once from two
# threads: a graph captured on a stream while another thread launches on it would record that launch.
STREAMS_PER_POOL = 32
_claims_lock = threading.RLock()  # reentrant: a garbage collection inside a claim may release another claim
_users: Counter[tuple[int, int]] = Counter()  # (device, stream id) -> live claims
_locks: dict[tuple[int, int], threading.RLock] = {}


class StreamClaim:
    """A CUDA stream for one owner (a Policy) with the lock its operations hold: a stream no other live claim
    has where one of the pool's is free, else the least shared one (its lock shared too). Released when the
    claim is garbage collected. `priority`: the stream's (0, the default, or negative: the GPU starts a
    higher priority stream's blocks first); torch keeps a pool of streams for each."""

    def __init__(self, device: torch.device | int | None = None, priority: int = 0,
                 new_stream: Callable[[], torch.cuda.Stream] | None = None):
        new_stream = new_stream or (lambda: torch.cuda.Stream(device, priority=priority))
        with _claims_lock:
            drawn: dict[tuple[int, int], torch.cuda.Stream] = {}
            for _ in range(STREAMS_PER_POOL):
                stream = new_stream()
                key = (stream.device_index, stream.stream_id)
                drawn.setdefault(key, stream)
                if _users[key] == 0:
                    break
            self.key = min(drawn, key=lambda k: _users[k])
            self.stream = drawn[self.key]
            _users[self.key] += 1
            self.lock = _locks.setdefault(self.key, threading.RLock())
        weakref.finalize(self, _release, self.key)


def _release(key: tuple[int, int]) -> None:
    with _claims_lock:
        _users[key] -= 1


class CapturedCall:
    """`fn(*tensors) -> tensor`, captured on first use; later calls copy inputs in and replay.

    The output tensor is reused by the next replay: consume it before calling again.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], pool=None, warmup: int = 2,
                 label: str = ""):
        self.inputs = [x.clone() for x in inputs]
        with _CAPTURE_LOCK:
            start = time.perf_counter()
            current = torch.cuda.current_stream()
            own = current != torch.cuda.default_stream()  # a Policy's StreamClaim: warm up and capture there
            side = current if own else torch.cuda.Stream()  # no other pool stream drawn (see StreamClaim)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(*self.inputs)
            current.wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other sessions' threads may launch work on the GPU meanwhile. Captured on the caller's
            # own stream (a Policy's) where it has one: a graph keeps the address of cuBLAS's workspace for the
            # (handle, stream) it was captured on, so graphs captured on torch's one default capture stream by
            # one thread share a workspace, and two of them replayed at once on two streams race in it (NaN
            # actions in 6 of 1,017 chunks of an 8-robot soak with 4 operations in flight, one H200;
            # pytorch/pytorch#193402).
            with torch.cuda.graph(self.graph, pool=pool, stream=current if own else None,
                                  capture_error_mode="thread_local"):
                self.output = fn(*self.inputs)
            took = time.perf_counter() - start
        for hook in CAPTURE_HOOKS:
            hook(label, took)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for dst, src in zip(self.inputs, inputs):
            dst.copy_(src)
        self.graph.replay()
        return self.output
