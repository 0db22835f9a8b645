"""Replay a fixed-shape computation as one CUDA graph.

Each denoising step runs ~20 kernels per block; for the small action chunks the GPU finishes them
faster than Python can launch them, so the steps are captured once and replayed.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

# One capture at a time in the process: entering a capture synchronises the device (and frees cached
# blocks), which fails while another thread's stream is capturing ("operation not permitted when stream
# is capturing"), as happens when several sessions' threads meet new shapes at once (models/batch.py).
_CAPTURE_LOCK = threading.Lock()


class CapturedCall:
    """`fn(*tensors) -> tensor`, captured on first use; later calls copy inputs in and replay.

    The output tensor is reused by the next replay: consume it before calling again.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], pool=None, warmup: int = 2):
        self.inputs = [x.clone() for x in inputs]
        with _CAPTURE_LOCK:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(*self.inputs)
            current = torch.cuda.current_stream()
            current.wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: other sessions' threads may launch work on the GPU meanwhile. Captured on the caller's
            # own stream (a Policy's) where it has one: a graph keeps the address of cuBLAS's workspace for the
            # (handle, stream) it was captured on, so graphs captured on torch's one default capture stream by
            # one thread share a workspace, and two of them replayed at once on two streams race in it (NaN
            # actions in 6 of 1,017 chunks of an 8-robot soak with 4 operations in flight, one H200;
            # pytorch/pytorch#193402).
            stream = None if current == torch.cuda.default_stream() else current
            with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                self.output = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for dst, src in zip(self.inputs, inputs):
            dst.copy_(src)
        self.graph.replay()
        return self.output
