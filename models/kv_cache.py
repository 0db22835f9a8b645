"""A fixed-size self-attention KV cache with window eviction and predicted vs observed entries.

The cache is a ring of `capacity` slots per layer, preallocated once. Entries are written in
order, so "evict the oldest first" is simply overwriting the ring's oldest slots, and the live
entries are the ring range `[head, tail)`; the bookkeeping is two host counters, with no device
synchronisation. Semantics follow the reference server: a write that does not fit evicts the
oldest entries first; a temporary write (a denoising step) is attended to and then released; a
chunk's final denoising pass is written as *predicted* entries, which `drop_predicted` removes
before the observed chunk is written in their place.

Static reads (the ones CUDA graphs capture) keep fixed addresses and need no mask in the two states
an episode spends its chunks in: until the ring first evicts, the live entries are its first `tail`
slots, read as that prefix (one graph per prefix length); once it is full, as it always is in steady
state, the whole ring. Entries dropped after an eviction leave a run of free slots (the observation pass
of a steady-state chunk: the action steps' temporary writes evicted the oldest 32 entries). A pass that
begins in that state first packs the ring (`_pack`): the live entries among its last f slots (f free) are
copied into the free slots before them, so the live entries are again a prefix (one copy a chunk, all
layers at once, instead of a masked read in each layer: H200, 9,792 keys, 205-217 us a layer masked
against 134 us unmasked). Where the pass's own new entries would land in those last slots, it reads the
whole ring under the live-slot mask instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import attention


@dataclass
class PendingWrite:
    start: int  # absolute position of the first new entry
    length: int
    keep: bool
    slots: torch.Tensor  # ring slots of the new entries, on the cache's device


class KVCache:
    def __init__(self, num_layers: int, batch: int, capacity: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.capacity = capacity
        shape = (num_layers, batch, capacity, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.device = self.k.device
        self._positions = torch.arange(capacity, device=self.device)
        # Which ring slots hold live entries, at a fixed address for captured graphs; kept current
        # whenever a static read needs it (static_extent() is None).
        self.valid = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        self.head = 0  # absolute positions; ring slot = position % capacity
        self.tail = 0
        self.predicted_from: int | None = None
        self._packed: tuple[int, int] | None = None  # (head, tail) when `_pack` made the live entries a prefix

    @classmethod
    def for_window(cls, num_layers: int, batch: int, attn_window: int, video_tokens_per_chunk: int,
                   action_tokens_per_chunk: int, heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device | str) -> "KVCache":
        """Room for window//2 chunks of video and action tokens, as the reference sizes it."""
        capacity = (attn_window // 2) * (video_tokens_per_chunk + action_tokens_per_chunk)
        return cls(num_layers, batch, capacity, heads, head_dim, dtype, device)

    def __len__(self) -> int:
        return self.tail - self.head

    @property
    def full(self) -> bool:
        return len(self) == self.capacity

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def clear(self) -> None:
        self.head = self.tail = 0
        self.predicted_from = None
        self._packed = None

    def static_extent(self) -> int | None:
        """What a static read returns: the ring's first n slots for n = this value (the whole ring when
        full; the live prefix [0, tail) while nothing has been evicted), or None: the whole ring under
        the live-slot mask. Captured graphs are keyed by it, as it fixes the read's shape."""
        if self.full:
            return self.capacity
        if self.head == 0:
            return self.tail
        return len(self) if self._packed == (self.head, self.tail) else None

    def row_extent(self) -> tuple[int, bool]:
        """What a batch's read of this cache covers (models/batch.py, through its row table): its first n slots
        and whether under the live-slot flags. The whole ring once full; the live prefix [0, tail) while nothing
        has been evicted; the whole ring under the flags after an eviction until it is full again (`begin(...,
        ring=True)` keeps them current)."""
        if self.full:
            return self.capacity, False
        if self.head == 0:
            return self.tail, False
        return self.capacity, True

    def begin(self, length: int, keep: bool, predicted: bool = False,
              slots_out: torch.Tensor | None = None, ring: bool = False) -> PendingWrite:
        """Reserve `length` entries at the end, evicting the oldest entries if full.

        `slots_out` (optional) receives the ring slots, for callers that need them at a fixed address;
        `ring`: the pass reads the ring by `row_extent`, so the live-slot mask is kept current (no pack).
        """
        if length > self.capacity:
            raise ValueError(f"write of {length} tokens exceeds the cache capacity {self.capacity}")
        overflow = len(self) + length - self.capacity
        if overflow > 0:
            self.head += overflow
            if self.predicted_from is not None and self.predicted_from < self.head:
                self.predicted_from = self.head
        if keep and predicted and self.predicted_from is None:
            self.predicted_from = self.tail
        slots = torch.remainder(self._positions[:length] + self.tail, self.capacity,
                                out=None if slots_out is None else slots_out[:length])
        write = PendingWrite(self.tail, length, keep, slots)
        self.tail += length
        self._packed = None  # a pack holds for the pass that made it: later writes may reuse its free slots
        if self.static_extent() is None and not ring:
            self._pack(write)
        # Only masked reads use it: two kernels saved per pass otherwise.
        if self.static_extent() is None or (ring and not self.full):
            self._update_valid()
        return write

    def _pack(self, w: PendingWrite) -> None:
        """Make the live entries the ring's first len(self) slots: copy the live ones among the last f slots
        (f = the free slots) into the free slots before them; the originals stay where they are, so the
        ring's order and eviction are untouched, and the copies sit in free slots that later writes reuse.
        Both sets are runs of consecutive slots (mod capacity), so the copy's indices are made on the
        device from two numbers. Skipped (the read stays masked) where `w`'s new entries land among the
        last f slots: they are written during the pass, after the copy."""
        cap, n = self.capacity, len(self)
        free = cap - n
        t = self.tail % cap  # the free slots: t, t + 1, ... (mod cap)
        back = [s for s in range(n, cap) if (s - t) % cap >= free]  # live, to be copied
        front = [(t + j) % cap for j in range(free) if (t + j) % cap < n]  # free, to receive them
        if any((s - w.start) % cap < w.length for s in back):
            return
        if back:
            assert back == list(range(back[0], back[0] + len(back)))
            assert front == [(front[0] + j) % cap for j in range(len(back))]
            k = len(back)
            src = self._positions[:k] + back[0]
            dst = torch.remainder(self._positions[:k] + front[0], cap)
            self.k[:, :, dst] = self.k[:, :, src]
            self.v[:, :, dst] = self.v[:, :, src]
        self._packed = (self.head, self.tail)

    def _update_valid(self) -> None:
        """Mark the live slots in `valid` (at its fixed address): the masked read's mask."""
        torch.lt(torch.remainder(self._positions - self.head, self.capacity), len(self), out=self.valid)

    def end(self, w: PendingWrite) -> None:
        if not w.keep:
            self.tail = w.start

    def drop_predicted(self) -> None:
        if self.predicted_from is not None:
            self.tail = max(self.head, self.predicted_from)
            self.predicted_from = None

    def live(self, layer: int, batch: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of every live entry (in ring order; attention does not depend on order)."""
        k, v = self.k[layer, batch], self.v[layer, batch]
        if self.full:
            return k, v
        h, t = self.head % self.capacity, self.tail % self.capacity
        if h < t or t == 0:
            end = t or self.capacity
            return k[:, h:end], v[:, h:end]
        return torch.cat([k[:, h:], k[:, :t]], dim=1), torch.cat([v[:, h:], v[:, :t]], dim=1)

    def destination(self, layer: int, w: PendingWrite, batch: slice = slice(None)
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where this layer's new keys/values go: (keys, values, slots) for `k[:, slots] = new`.
        A batch subset (the conditional half under CFG) may only make temporary writes."""
        if w.keep and batch != slice(None):
            raise ValueError("a kept cache write must cover the whole batch")
        return self.k[layer, batch], self.v[layer, batch], w.slots

    def store(self, layer: int, w: PendingWrite, k: torch.Tensor, v: torch.Tensor,
              batch: slice = slice(None)) -> None:
        """Store this layer's new keys/values (`destination` for writers that store them themselves)."""
        keys, values, slots = self.destination(layer, w, batch)
        keys.index_copy_(1, slots, k)
        values.index_copy_(1, slots, v)

    def read(self, layer: int, batch: slice = slice(None), static: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every live entry's keys/values and a mask, the new entries stored.

        static: read at fixed addresses for captured graphs (see `static_extent`): a prefix of the
        ring with no mask, or the whole ring with the live-slot mask; otherwise the live entries alone
        and no mask.
        """
        if not static:
            return *self.live(layer, batch), None
        n = self.static_extent()
        if n is None:
            return self.k[layer, batch], self.v[layer, batch], self.valid.view(1, 1, 1, -1)
        return self.k[layer, batch, :n], self.v[layer, batch, :n], None


@dataclass
class CachedSelfAttention:
    """Self-attention of new tokens over the cache plus themselves (the inference path)."""

    cache: KVCache
    pending: PendingWrite
    batch: slice = field(default_factory=lambda: slice(None))
    backend: str = "sdpa"
    static: bool = False

    def destination(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the block's compiled attn_in region stores this layer's new keys/values itself: in the
        kernel that applies the rotary, not in two copies after it (H200: 960 copies of about 4 us a
        chunk at the paper's point)."""
        return self.cache.destination(layer, self.pending, self.batch)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        """k, v: the new keys/values, or None where the caller stored them at `destination`."""
        if k is not None and v is not None:
            self.cache.store(layer, self.pending, k, v, self.batch)
        keys, values, mask = self.cache.read(layer, self.batch, self.static)
        return attention(q, keys, values, mask, self.backend)
