"""Several robots' chunks denoised as one batch: the GEMMs of N episodes' denoising passes run over
N times the tokens, while each episode's attention reads its own KV cache and its own prompt.

Why: an action pass (32 tokens against 10 GB of bf16 block weights at the robotwin preset) reads the
weights whatever its batch, so N robots share that read (each still reads its own 7 GB cache); the video
passes are compute bound and gain from fewer launches only. Each robot's result equals its chunk run
alone up to the GEMMs' rounding (another batch size may pick another kernel); its noise, cache reads
and writes are its own. Measured on one H200 it does not pay yet (bench/results/serve_load_h200_batched.md:
batches of changing sizes recompile and recapture), so `vaops serve` runs chunks one by one unless
`--max-batch` asks for more.

How: every engine of one `ChunkBatcher` routes its chunks through it (`BatchingEngine`). A thread
whose chunk is due queues it; one thread at a time leads and runs whatever is queued as one batch
(compatible chunks: the same sampling settings), then hands the lead to a waiting thread once its own
chunk is done. There is no timer unless `gather_s` asks for one: chunks that come due while a batch
runs form the next one.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from .cuda_graphs import CapturedCall
from .engine import Chunk, InferenceEngine, denoise
from .flow_matching import Schedule
from .kv_cache import CachedSelfAttention
from .transformer import StackedText

# Captured graphs of batched steps, least recently used dropped first: a group of robots that stays
# together (robots started together, the common case) reuses its graphs (about 15 over an episode, see
# ChunkBatcher._graph); other groupings would otherwise keep adding them.
MAX_BATCH_GRAPHS = 128


@dataclass
class _Request:
    engine: "BatchingEngine"
    video: torch.Tensor  # [1, C, F, H, W] its initial noise
    actions: torch.Tensor  # [1, A, F, N, 1]
    first: torch.Tensor | None  # [1, C, 1, H, W] at an episode's first chunk
    cache_actions: bool  # InferenceEngine.caches_actions
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    done: bool = False
    result: Chunk | None = None
    error: BaseException | None = None

    def key(self) -> tuple:
        """Chunks that may share a batch: the same schedules, guidance and CFG batch."""
        e = self.engine
        return (e.config.sampling, e.batch, e.skip_unguided_uncond, e.device, e.model, self.cache_actions)


@dataclass
class StackedSelfAttention:
    """Self-attention of a batch whose consecutive rows belong to different episodes' caches."""

    parts: list[tuple[int, CachedSelfAttention]]  # (rows, attention over that episode's cache)

    def destination(self, layer: int) -> None:
        return None  # the rows go to several caches: stored by each part's call

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        assert k is not None and v is not None, "a stacked self-attention takes its keys with the call"
        rows = [n for n, _ in self.parts]
        return torch.cat([attn(layer, qi, ki, vi) for (_, attn), qi, ki, vi
                          in zip(self.parts, q.split(rows), k.split(rows), v.split(rows))])


class ChunkBatcher:
    def __init__(self, max_batch: int = 8, gather_s: float = 0.0):
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch} must be at least 1")
        self.max_batch = max_batch
        self.gather_s = gather_s
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)  # a chunk was queued: a full batch need not wait longer
        self._queue: list[_Request] = []
        self._leading = False
        self._graphs: OrderedDict[tuple, CapturedCall] = OrderedDict()
        self._graph_pool = None
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size ran

    # ----- queueing -----
    def act(self, request: _Request) -> Chunk:
        with self._lock:
            self._queue.append(request)
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
        assert request.result is not None
        return request.result

    def _round(self, leader: _Request) -> None:
        with self._lock:
            # Gather for gather_s, or until a full batch is queued: under load (observes taking longer) a
            # fixed window split robots that were in step; a full batch gains nothing by waiting.
            deadline = time.monotonic() + self.gather_s
            while len(self._queue) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._queued.wait(left)
            key = self._queue[0].key()
            group = [r for r in self._queue if r.key() == key][: self.max_batch]
            for r in group:
                self._queue.remove(r)
        group.sort(key=lambda r: id(r.engine))  # one order per set of robots: its graphs do not depend on arrival
        try:
            results = self._run(group)
            for r, chunk in zip(group, results):
                r.result = chunk
        except BaseException as e:  # every chunk of the batch failed with it; the lead goes on
            for r in group:
                r.error = e
        self.batch_sizes[len(group)] += 1
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

    # ----- compute -----
    def _run(self, group: list[_Request]) -> list[Chunk]:
        if len(group) == 1:  # the engine's own path and graphs
            r = group[0]
            return [r.engine._denoise_chunk(r.video, r.actions, r.first, r.cache_actions)]
        engines = [r.engine for r in group]
        e0 = engines[0]
        s = e0.config.sampling
        video, cached = self._denoise("video", engines, torch.cat([r.video for r in group]), e0.video_schedule,
                                      s.guidance_scale, [r.first for r in group])
        zero = [None if r.first is None else torch.zeros_like(r.actions[:, :, :1]) for r in group]
        actions, _ = self._denoise("action", engines, torch.cat([r.actions for r in group]), e0.action_schedule,
                                   s.action_guidance_scale, zero, cache_last=group[0].cache_actions)
        masks = torch.cat([e.action_mask for e in engines])
        actions = actions * masks
        return [e._video_chunk(video[i:i + 1].clone(), None if cached is None else cached[i:i + 1].clone(),
                               actions[i:i + 1].clone()) for i, e in enumerate(engines)]

    def _denoise(self, kind: str, engines: list["BatchingEngine"], x: torch.Tensor, schedule: Schedule,
                 guidance: float, firsts: list[torch.Tensor | None], cache_last: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`denoise` over a batch with one row per engine; rows at their episode's first chunk hold their first
        frame fixed."""
        e0 = engines[0]
        rows = [i for i, f in enumerate(firsts) if f is not None]
        first = torch.cat([firsts[i] for i in rows]).to(x.device) if rows else None
        mask = torch.cat([e.action_mask for e in engines]) if kind == "action" else None

        def forward(x: torch.Tensor, t: torch.Tensor, last: bool, cond_only: bool) -> torch.Tensor:
            return self._forward(kind, engines, x, t, keep=last, predicted=last, cond_only=cond_only)

        return denoise(forward, x, schedule, guidance, first, torch.tensor(rows, device=x.device), mask,
                       e0.batch == 2 and e0.skip_unguided_uncond, cache_last)

    def _forward(self, kind: str, engines: list["BatchingEngine"], x: torch.Tensor, t: torch.Tensor, keep: bool,
                 predicted: bool, cond_only: bool) -> torch.Tensor:
        """InferenceEngine._forward over the batch: each engine's rows (CFG's two, or the conditional
        one) attend to its cache and prompt; returns [rows, ...] in engine order."""
        e0 = engines[0]
        rows = 1 if cond_only else e0.batch
        batch = slice(0, 1) if cond_only else slice(None)
        fn, f, h, w = e0._pass(kind, x)
        ropes = [e._rope(kind, f, h, w) for e in engines]
        cos = torch.stack([c for c, _ in ropes]).repeat_interleave(rows, 0)
        sin = torch.stack([s for _, s in ropes]).repeat_interleave(rows, 0)
        pending = [e.live_cache.begin(f * h * w, keep=keep, predicted=predicted, slots_out=e._slots[kind],
                                      ring=True) for e in engines]
        text = StackedText([(rows, e.live_text.select(batch) if cond_only else e.live_text) for e in engines])

        def run(x: torch.Tensor, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            attn = StackedSelfAttention([(rows, CachedSelfAttention(e.live_cache, p, batch, e.backend,
                                                                    static=e.static_reads, ring=e.static_reads))
                                         for e, p in zip(engines, pending)])
            return fn(x, t, (cos, sin), text, attn, e0.backend).float()

        xb = x.repeat_interleave(rows, 0).to(e0.dtype)
        tb = t.repeat_interleave(rows, 0)
        graph = self._graph(kind, engines, xb, run, [xb, tb, cos, sin]) if e0.cuda_graphs else None
        out = run(xb, tb, cos, sin) if graph is None else graph(xb, tb, cos, sin)
        for e, p in zip(engines, pending):
            e.live_cache.end(p)
        return out

    def _graph(self, kind: str, engines: list["BatchingEngine"], x: torch.Tensor, run,
               inputs: list[torch.Tensor]) -> CapturedCall:
        """Keyed by what fixes the step's shapes and addresses: the tokens, and per engine its cache
        (the engine), the extent of its ring read and whether it is masked, and the prompt's buffers. Not
        the filling level: a group of robots needs 3 graphs (video steps, action steps, final pass) for
        each of 5 read extents (KVCache.ring_extent) where a single robot needs one per level."""
        key = (kind, tuple(x.shape), tuple((id(e), e.live_cache.ring_extent(), e.live_cache.full,
                                            e.live_text.kv[0][0].data_ptr()) for e in engines))
        graph = self._graphs.get(key)
        if graph is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            while len(self._graphs) >= MAX_BATCH_GRAPHS:
                self._graphs.popitem(last=False)
            graph = self._graphs[key] = CapturedCall(run, inputs, pool=self._graph_pool)
        else:
            self._graphs.move_to_end(key)
        return graph


class BatchingEngine(InferenceEngine):
    """An InferenceEngine whose chunks go through a shared ChunkBatcher (see the module's docstring);
    everything else (reset, observe, the cache) is its own."""

    def __init__(self, *args, batcher: ChunkBatcher, **kwargs):
        super().__init__(*args, **kwargs)
        self.batcher = batcher

    def _act(self, first_latent: torch.Tensor | None, video_noise: torch.Tensor | None,
             action_noise: torch.Tensor | None, generator: torch.Generator | None, ahead: bool = False) -> Chunk:
        # The checks and the noise draws happen here, in the robot's own thread, in the order the
        # engine's own path draws them, so a robot's chunks do not depend on who it is batched with.
        video, actions, first = self._chunk_inputs(first_latent, video_noise, action_noise, generator)
        return self.batcher.act(_Request(self, video, actions, first, self.caches_actions(ahead)))
