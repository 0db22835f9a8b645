"""Several robots' action steps as one batch: the action passes of N episodes whose chunks reach their actions
together run over N times the tokens, while each episode's attention reads its own KV cache and its own prompt.

Why the action steps: an action pass (32 tokens) reads the block weights whatever its batch, so N robots share
that read; on one H200 in FP8 an action step costs 5.0 ms for one robot and 13.6 ms for eight, 1.7 ms each
(bench/results/pass_batched_h200.md). The video passes are compute bound (15% less a robot batched) and stay
each robot's own, on its own CUDA stream, beside the other robots' (models/policy.py): batching them as well
(this module's first version, bench/results/serve_load_h200_batched.md) cost more in graphs than it gained.
Each robot's actions equal its chunk run alone up to the GEMMs' rounding (another batch size may pick another
kernel); its noise, cache reads and writes are its own.

How: every engine of one `ChunkBatcher` routes its chunks' action phases through it (`BatchingEngine`). A
thread whose action phase is due queues it; one thread at a time leads and runs whatever is queued as one
batch (compatible phases: the same action schedule and guidance), then hands the lead to a waiting thread
once its own phase is done. A phase is due once its robot's video passes have run on the GPU (`_gather`); the
first due phase waits up to `gather_s` for others while other robots are active, and phases that come due while
a batch runs form the next one. A phase that runs alone runs in its own thread, on its own stream, as the
engine's own path. A batch runs on the batcher's own CUDA stream, after each robot's stream's work (events), and
each robot's stream waits for it.

On a GPU (bf16, the `splitkv` backend) a batch's attention reads every robot's cache and prompt in one kernel
launch a layer through a row table (models/split_kv.py `split_kv_rows`), so the CUDA graph of a batched step
depends on the batch's size only: one graph for each size, whichever robots make it up and however full their
caches are. Elsewhere (CPU, tests) each robot's rows read its cache in a call of their own.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .attention import attention
from .cuda_graphs import CapturedCall
from .engine import InferenceEngine, denoise
from .kv_cache import CachedSelfAttention, PendingWrite
from .transformer import TextContext

# How often a batch's leader checks whether the phases queued are due on the GPU: a fraction of an action step
# (5 ms for one robot on one H200, bench/results/pass_batched_h200.md).
POLL_S = 2e-4
# A robot that queued or finished an action phase this recently may join a batch: the first due phase waits
# `gather_s` for others only while another robot is this active (a robot at 50 Hz queues one each 0.64 s), so a
# robot served alone never waits for batches that cannot form.
ACTIVE_S = 1.0


@dataclass
class _Request:
    engine: "BatchingEngine"
    actions: torch.Tensor  # [1, A, F, N, 1] its initial noise
    first: bool  # an episode's first chunk: its first action frame is held at zero
    cache_actions: bool  # InferenceEngine.caches_actions
    stream: torch.cuda.Stream | None  # the caller's, which waits for the batch
    ready: torch.cuda.Event | None  # the caller's work before the phase (its video passes)
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    done: bool = False
    alone: bool = False  # queued alone: its own thread runs it, on its own stream
    result: torch.Tensor | None = None
    finished: torch.cuda.Event | None = None
    error: BaseException | None = None

    def key(self) -> tuple:
        """Phases that may share a batch: the same action schedule, guidance and CFG batch."""
        e = self.engine
        s = e.config.sampling
        return (s.action_steps, s.action_shift, s.action_guidance_scale, e.batch, e.skip_unguided_uncond,
                e.device, e.model, self.cache_actions)


def tabled(device: torch.device, dtype: torch.dtype, backend: str, head_dim: int) -> bool:
    """Whether a batch's attention reads through row tables (models/split_kv.py): a GPU with the `splitkv`
    backend in bf16 or fp16, or Triton's interpreter (TRITON_INTERPRET=1: the tests, on a CPU); the kernel takes
    power-of-two head dims from 16."""
    if backend != "splitkv" or head_dim < 16 or head_dim & (head_dim - 1):
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    from .attention import _split_kv_kernel

    return _split_kv_kernel(device) is not None


class RowTables:
    """What a batch's attention reads, as models/split_kv.py's row tables: one row a (robot, CFG row), whose
    offsets are counted from anchors that live as long as the batcher, so that the graphs that read the tables
    stay valid whichever robots a batch holds."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        from .split_kv import ALIGN, ROW_FIELDS  # imports triton: only where `tabled`

        self.align, self.fields = ALIGN.value, ROW_FIELDS.value
        self.anchor = torch.zeros(64, dtype=dtype, device=device)
        self.flags = torch.ones(0, dtype=torch.uint8, device=device)  # all keys live: rows with no mask
        self.size = self.anchor.element_size()

    def offset(self, t: torch.Tensor) -> int:
        """t's first element, in elements from the anchor."""
        if t.dtype != self.anchor.dtype:
            raise ValueError(f"a batch reads {self.anchor.dtype} keys, got {t.dtype}")
        delta = t.data_ptr() - self.anchor.data_ptr()
        if delta % (self.align * self.size):  # the kernels' loads are vectorised on it (models/split_kv.py)
            raise ValueError(f"a batch's keys must start at whole multiples of {self.align} elements")
        return delta // self.size

    def cache(self, engines: list["BatchingEngine"], pending: list[PendingWrite], rows: int) -> torch.Tensor:
        """[layers, R, ROW_FIELDS] for the rows' caches: each reads its cache's live prefix, or the whole ring (under
        its live-slot flags once entries were evicted and it is not full: KVCache.row_extent)."""
        base, step = [], None
        for e, p in zip(engines, pending):
            cache = e.live_cache
            keys, masked = cache.row_extent()
            flags = cache.valid.data_ptr() - self.flags.data_ptr() if masked else 0
            if flags % self.align:
                raise ValueError(f"a cache's live-slot flags must start at whole multiples of {self.align} bytes")
            for j in range(rows):
                base.append((self.offset(cache.k[0, j]), self.offset(cache.v[0, j]), flags, keys,
                             p.start % cache.capacity))
            layer = (cache.k.stride(0), cache.v.stride(0))
            if step not in (None, layer):
                raise ValueError("a batch's caches need one layout")
            step = layer
        assert step is not None
        layers = engines[0].model.config.num_layers
        table = np.asarray(base, dtype=np.int64)[None].repeat(layers, 0)
        table[:, :, 0] += np.arange(layers)[:, None] * step[0]
        table[:, :, 1] += np.arange(layers)[:, None] * step[1]
        return self._device(table)

    def text(self, texts: list[TextContext], rows: int) -> torch.Tensor:
        """[layers, R, ROW_FIELDS] for the rows' prompts (CFG row j reads its prompt's row j: "" for the second)."""
        table = np.zeros((len(texts[0].kv), len(texts) * rows, self.fields), dtype=np.int64)
        for layer in range(table.shape[0]):
            for i, text in enumerate(texts):
                k, v = text.kv[layer]
                for j in range(rows):
                    table[layer, i * rows + j, :4] = (self.offset(k[j]), self.offset(v[j]), 0, k.shape[1])
        return self._device(table)

    def _device(self, table: np.ndarray) -> torch.Tensor:
        # Through pinned memory without waiting: torch's pinned allocator keeps the block until the copy is done.
        host = torch.from_numpy(table)
        if self.anchor.is_cuda:
            return host.pin_memory().to(self.anchor.device, non_blocking=True)
        return host

    def cover(self, keys: int) -> torch.Tensor:
        """The all-live flags, at least `keys` long; graphs hold its address, so it is made once per batcher at
        the largest ring (ChunkBatcher._graphs are dropped if it ever grows)."""
        if self.flags.numel() < keys:
            self.flags = torch.ones(keys, dtype=torch.uint8, device=self.anchor.device)
        return self.flags


@dataclass
class TabledSelfAttention:
    """Self-attention of a batch's rows, each over its own robot's cache plus its new entries, which are stored
    (temporarily, or kept by a phase's final pass) in its cache as the engine's own pass stores them."""

    tables: RowTables
    rows: torch.Tensor  # [layers, R, ROW_FIELDS]
    capacity: int
    strides: tuple[tuple[int, int], tuple[int, int]]  # (key, head) of the caches' keys and values

    def destination(self, layer: int) -> None:
        return None  # the rows go to several caches: stored by the call

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        from .split_kv import split_kv_rows, store_rows

        assert k is not None and v is not None, "a batch's self-attention takes its keys with the call"
        t = self.tables
        store_rows(k, v, t.anchor, t.anchor, self.rows[layer], self.capacity, *self.strides)
        return split_kv_rows(q, t.anchor, t.anchor, t.flags, self.rows[layer], self.capacity, *self.strides)


@dataclass
class TabledText:
    """Cross-attention of a batch's rows, each over its own robot's prompt."""

    tables: RowTables
    rows: torch.Tensor  # [layers, R, ROW_FIELDS]
    keys: int  # the longest prompt
    strides: tuple[int, int]  # (key, head) of the prompts' keys and values

    def attend(self, layer: int, q: torch.Tensor, backend: str) -> torch.Tensor:
        from .split_kv import split_kv_rows

        t = self.tables
        return split_kv_rows(q, t.anchor, t.anchor, t.flags, self.rows[layer], self.keys, self.strides, self.strides)


@dataclass
class StackedSelfAttention:
    """Self-attention of a batch whose consecutive rows belong to different episodes' caches, a call each."""

    parts: list[tuple[int, CachedSelfAttention]]  # (rows, attention over that episode's cache)

    def destination(self, layer: int) -> None:
        return None  # the rows go to several caches: stored by each part's call

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        assert k is not None and v is not None, "a stacked self-attention takes its keys with the call"
        rows = [n for n, _ in self.parts]
        return torch.cat([attn(layer, qi, ki, vi) for (_, attn), qi, ki, vi
                          in zip(self.parts, q.split(rows), k.split(rows), v.split(rows))])


@dataclass
class StackedText:
    """The prompts of a batch whose consecutive rows belong to different episodes, a call each."""

    parts: list[tuple[int, TextContext]]  # (rows, context)

    def attend(self, layer: int, q: torch.Tensor, backend: str) -> torch.Tensor:
        rows = [n for n, _ in self.parts]
        return torch.cat([attention(qi, *text.kv[layer], backend=backend)
                          for qi, (_, text) in zip(q.split(rows), self.parts)])


class ChunkBatcher:
    """`on_batch(size)`: called after each batch ran (the server counts them in its metrics)."""

    def __init__(self, max_batch: int = 8, gather_s: float = 0.0, on_batch: Callable[[int], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch} must be at least 1")
        self.max_batch = max_batch
        self.gather_s = gather_s
        self.on_batch = on_batch
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)  # a phase was queued: a full batch need not wait longer
        self._queue: list[_Request] = []
        self._leading = False
        self._graphs: dict[tuple, CapturedCall] = {}  # one a batch shape (BatchingEngine: one a size)
        self._graph_pool = None
        self._tables: RowTables | None = None
        self._stream: torch.cuda.Stream | None = None
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size ran
        self._seen: dict[int, float] = {}  # id(engine) -> when it last queued or finished a phase

    # ----- queueing -----
    def act(self, request: _Request) -> torch.Tensor:
        """The phase's actions [1, A, F, N, 1], unmasked; on a GPU ordered on the caller's stream."""
        with self._lock:
            self._queue.append(request)
            self._seen_now([request])
            self._queued.notify_all()
            if not self._leading:
                self._leading = request.lead = True
        while not request.done:
            if request.lead:
                self._round(request)
            else:
                request.wake.wait()
                request.wake.clear()
        if request.error is not None:
            raise request.error
        if request.alone:
            return request.engine.own_actions(request.actions, request.first, request.cache_actions)
        if request.finished is not None and request.stream is not None:
            request.stream.wait_event(request.finished)
        assert request.result is not None
        return request.result

    def _round(self, leader: _Request) -> None:
        group = self._gather()
        group.sort(key=lambda r: id(r.engine))  # one order per set of robots
        if len(group) == 1:
            group[0].alone = True
        else:
            try:
                for r, actions in zip(group, self._run(group)):
                    r.result = actions
            except BaseException as e:  # every phase of the batch failed with it; the lead goes on
                for r in group:
                    r.error = e
        self.batch_sizes[len(group)] += 1
        if self.on_batch is not None:
            self.on_batch(len(group))
        with self._lock:
            self._seen_now(group)
        for r in group:
            r.done = True
            if r is not leader:
                r.wake.set()
        if leader.done:
            with self._lock:
                if self._queue:
                    nxt = self._queue[0]
                    nxt.lead = True
                    nxt.wake.set()
                else:
                    self._leading = False

    def warm_up(self, engine: "BatchingEngine") -> int:
        """Run a batch of each size up to max_batch once, so that on a GPU its graphs (the steps' and the cache
        pass's: a batch's graphs depend on its size only) are captured here rather than in robots' chunks. The
        batches are of `engine` alone, repeated (their reads and writes of its cache overlap): reset it before an
        episode. Returns the batches run."""
        engine._require_episode()
        c, a = engine.config, engine.model.config.action_dim
        noise = torch.zeros(1, a, c.frame_chunk_size, c.action_per_frame, 1, device=engine.device)
        sizes = range(2, self.max_batch + 1)
        for n in sizes:
            group = [engine.request(noise, False, True) for _ in range(n)]
            self._run(group)
            for r in group:
                if r.finished is not None and r.stream is not None:
                    r.stream.wait_event(r.finished)
            engine.live_cache.drop_predicted()
        return len(sizes)

    @property
    def _active_s(self) -> float:
        """How recently a robot queued or finished a phase to count as active: ACTIVE_S, plus the rounds' own
        gathering (a robot's cycle includes its waits for batches)."""
        return ACTIVE_S + 2 * self.gather_s

    def _seen_now(self, requests: list[_Request]) -> None:
        """Mark the requests' robots active (under the lock), forgetting those idle longer than `_active_s`."""
        now = time.monotonic()
        self._seen = {k: t for k, t in self._seen.items() if t > now - self._active_s}
        for r in requests:
            self._seen[id(r.engine)] = now

    def _gather(self) -> list[_Request]:
        """The next batch: the first queued phase and those like it that are due, once it is due itself and for
        `gather_s` more, or until max_batch are. On a GPU a phase is due when the work before it (its video passes)
        has run: robots' threads queue their kernels far ahead of the GPU, so phases queued while the first one's
        video runs join it, at no cost to it; a phase whose video is still to run would hold the batch back and
        waits for the next. On a CPU a phase is due when queued. While no other robot is active (ACTIVE_S), the
        first phase goes at once, alone: a robot served alone runs as without the batcher."""
        deadline = None
        while True:
            with self._lock:
                head = self._queue[0]
                now = time.monotonic()
                if not (any(r.engine is not head.engine for r in self._queue)  # queued: active, however long ago
                        or any(k != id(head.engine) and t > now - self._active_s for k, t in self._seen.items())):
                    self._queue.remove(head)
                    return [head]
                key = head.key()
                due = [r for r in self._queue if r.key() == key and (r.ready is None or r.ready.query())]
                if head in due:
                    deadline = deadline or now + self.gather_s
                    if len(due) >= self.max_batch or now >= deadline:
                        group = due[: self.max_batch]
                        for r in group:
                            self._queue.remove(r)
                        return group
                if head.ready is None:  # nothing to poll: wait for a phase to be queued
                    self._queued.wait(max(0.0, deadline - now) if deadline else None)
                    continue
            time.sleep(POLL_S)

    # ----- compute -----
    def _run(self, group: list[_Request]) -> list[torch.Tensor]:
        e0 = group[0].engine
        if not e0.device.type == "cuda":
            return self._denoise(group)
        if self._stream is None:
            self._stream = torch.cuda.Stream(e0.device, priority=-1)
        stream = self._stream
        for r in group:
            if r.ready is not None:
                stream.wait_event(r.ready)
        with torch.cuda.stream(stream):
            results = self._denoise(group)
            finished = torch.cuda.Event()
            finished.record(stream)
        for r, actions in zip(group, results):
            if r.stream is not None:
                actions.record_stream(r.stream)  # freed by the robot's thread, used on its stream
            r.finished = finished
        return results

    def _denoise(self, group: list[_Request]) -> list[torch.Tensor]:
        """`denoise` over the action phases of the group, a row each; rows at their episode's first chunk hold
        their first action frame at zero."""
        engines = [r.engine for r in group]
        e0 = engines[0]
        x = torch.cat([r.actions for r in group]).to(e0.device)
        rows = [i for i, r in enumerate(group) if r.first]
        first = torch.zeros_like(x[:len(rows), :, :1]) if rows else None
        mask = torch.cat([e.action_mask for e in engines])
        text_tables: dict[int, torch.Tensor] = {}  # the prompts' row tables by rows per robot: made once a phase

        def forward(x: torch.Tensor, t: torch.Tensor, last: bool, cond_only: bool) -> torch.Tensor:
            return self._forward(engines, x, t, keep=last, cond_only=cond_only, text_tables=text_tables)

        s = e0.config.sampling
        # The rows' indices copied to the device only at episodes' first chunks: the copy waits for the stream.
        first_rows = torch.tensor(rows, device=x.device) if rows else slice(None)
        actions, _ = denoise(forward, x, e0.action_schedule, s.action_guidance_scale, first, first_rows, mask,
                             e0.batch == 2 and e0.skip_unguided_uncond, group[0].cache_actions)
        actions = actions * mask
        return [actions[i:i + 1].clone() for i in range(len(group))]

    def _forward(self, engines: list["BatchingEngine"], x: torch.Tensor, t: torch.Tensor, keep: bool,
                 cond_only: bool, text_tables: dict[int, torch.Tensor]) -> torch.Tensor:
        """InferenceEngine._forward of an action pass over the batch: each engine's rows (CFG's two, or the
        conditional one) attend to its cache and prompt; returns [rows, ...] in engine order. `text_tables`: the
        phase's prompt row tables made so far (`_tabled`)."""
        e0 = engines[0]
        rows = 1 if cond_only else e0.batch
        batch = slice(0, 1) if cond_only else slice(None)
        fn, f, h, w = e0._pass("action", x)
        ropes = [e._rope("action", f, h, w) for e in engines]
        cos = torch.stack([c for c, _ in ropes]).repeat_interleave(rows, 0)
        sin = torch.stack([s for _, s in ropes]).repeat_interleave(rows, 0)
        pending = [e.live_cache.begin(f * h * w, keep=keep, predicted=keep, slots_out=e._slots["action"], ring=True)
                   for e in engines]
        xb = x.repeat_interleave(rows, 0).to(e0.dtype)
        tb = t.repeat_interleave(rows, 0)
        try:
            if not tabled(e0.device, e0.dtype, e0.backend, e0.model.config.attention_head_dim):
                attn = StackedSelfAttention([(rows, CachedSelfAttention(e.live_cache, p, batch, e.backend))
                                             for e, p in zip(engines, pending)])
                text = StackedText([(rows, e.live_text.select(batch) if cond_only else e.live_text)
                                    for e in engines])
                return fn(xb, tb, (cos, sin), text, attn, e0.backend).float()
            return self._tabled(engines, pending, rows, fn, [xb, tb, cos, sin], text_tables)
        finally:
            for e, p in reversed(list(zip(engines, pending))):  # last first: a warm-up's batch repeats one cache
                e.live_cache.end(p)

    def _tabled(self, engines: list["BatchingEngine"], pending: list[PendingWrite], rows: int, fn,
                inputs: list[torch.Tensor], text_tables: dict[int, torch.Tensor]) -> torch.Tensor:
        """The pass with every row's attention read through row tables: one graph a batch shape on a GPU. The
        caches' table is made for each pass (its writes move the rings); the prompts', once a phase for each
        number of rows a robot (`text_tables`)."""
        e0 = engines[0]
        if self._tables is None:
            self._tables = RowTables(e0.device, e0.dtype)
        tables = self._tables
        cache = e0.live_cache
        texts = [e.live_text for e in engines]
        text_keys = max(t.kv[0][0].shape[1] for t in texts)
        if tables.flags.numel() < max(cache.capacity, text_keys):
            self._graphs.clear()  # they read the old flags
            tables.cover(max(cache.capacity, text_keys))
        self_rows = tables.cache(engines, pending, rows)
        if rows not in text_tables:
            text_tables[rows] = tables.text(texts, rows)
        text_rows = text_tables[rows]
        k0 = texts[0].kv[0][0]
        cache_strides = ((cache.k.stride(2), cache.k.stride(3)), (cache.v.stride(2), cache.v.stride(3)))
        text_strides = (k0.stride(1), k0.stride(2))
        shape = (tuple(inputs[0].shape), cache.capacity, text_keys, cache_strides, text_strides)

        def run(x: torch.Tensor, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, self_rows: torch.Tensor,
                text_rows: torch.Tensor) -> torch.Tensor:
            attn = TabledSelfAttention(tables, self_rows, cache.capacity, cache_strides)
            text = TabledText(tables, text_rows, text_keys, text_strides)
            return fn(x, t, (cos, sin), text, attn, e0.backend).float()

        args = [*inputs, self_rows, text_rows]
        if not (e0.cuda_graphs and e0.device.type == "cuda"):
            return run(*args)
        graph = self._graphs.get(shape)
        if graph is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = self._graphs[shape] = CapturedCall(run, args, pool=self._graph_pool, label=f"batch {shape}")
        return graph(*args)


class BatchingEngine(InferenceEngine):
    """An InferenceEngine whose chunks' action phases go through a shared ChunkBatcher (see the module's
    docstring); everything else (reset, the video passes, observe, the cache) is its own."""

    def __init__(self, *args, batcher: ChunkBatcher, **kwargs):
        super().__init__(*args, **kwargs)
        self.batcher = batcher

    def _denoise_actions(self, actions: torch.Tensor, first: bool, cache_actions: bool) -> torch.Tensor:
        if self.batcher.max_batch == 1:  # batching off: no wait for the GPU to reach the phase
            return self.own_actions(actions, first, cache_actions)
        return self.batcher.act(self.request(actions, first, cache_actions))

    def request(self, actions: torch.Tensor, first: bool, cache_actions: bool) -> _Request:
        """An action phase for the batcher, after the work queued so far on the caller's stream."""
        stream = ready = None
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            ready = torch.cuda.Event()
            ready.record(stream)
        return _Request(self, actions, first, cache_actions, stream, ready)

    def own_actions(self, actions: torch.Tensor, first: bool, cache_actions: bool) -> torch.Tensor:
        """The phase as the engine runs it alone (its own passes and graphs, on the caller's stream)."""
        return InferenceEngine._denoise_actions(self, actions, first, cache_actions)
