"""Several robots' chunks as one batch (models/batch.py): each robot's chunks equal its chunks run alone,
only compatible chunks share a batch, a failure reaches every robot of its batch and no other, and
the batched ring reads equal the engine's own reads."""

import dataclasses
import threading

import numpy as np
import pytest
import torch

from vaops.models.attention import attention
from vaops.models.batch import ChunkBatcher
from vaops.models.checkpoint import build_random_weights
from vaops.models.config import get_preset
from vaops.models.kv_cache import KVCache

PRESET = get_preset("tiny")


def images(seed):
    rng = np.random.default_rng(seed)
    return {c.key: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in PRESET.cameras}


def episode(policy, seed, chunks=4, start=None, operating_point=None):
    policy.reset(f"task {seed}", seed=seed, operating_point=operating_point)
    out = []
    for c in range(chunks):
        if start is not None:
            start.wait()
        chunk = policy.act(images(seed * 100) if c == 0 else None)
        out.append(chunk.actions)
        frames = (PRESET.frame_chunk_size - (c == 0)) * PRESET.frames_per_latent
        policy.observe([images(seed * 100 + c * 10 + i) for i in range(frames)], chunk.actions)
    return out


def in_threads(fn, n):
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a robot never got its chunk (the batcher's lead was lost)"
    return results, errors


@pytest.fixture(scope="module")
def weights():
    return build_random_weights(PRESET, seed=0)


def batched(weights, max_batch=8, gather_s=0.05):
    w = dataclasses.replace(weights, batcher=ChunkBatcher(max_batch=max_batch, gather_s=gather_s))
    return w, w.batcher


def test_robots_in_step_share_every_batch_and_get_their_own_chunks(weights):
    alone = [episode(weights.new_policy(), seed) for seed in range(3)]
    # A batch of three gathers until the three are queued (at most 30 s): robots in step share it on a loaded
    # machine too, where a 50 ms window split them.
    w, batcher = batched(weights, max_batch=3, gather_s=30.0)
    policies = [w.new_policy() for _ in range(3)]
    start = threading.Barrier(3)
    together, errors = in_threads(lambda i: episode(policies[i], i, start=start), 3)
    assert not errors
    assert dict(batcher.batch_sizes) == {3: 4}  # 4 chunks, each one batch of the 3 robots
    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            assert np.abs(x - y).max() < 1e-5  # the GEMMs' rounding (fp32), nothing else
    # Three different episodes: batching did not mix them up.
    assert not np.allclose(together[0][1], together[1][1])


def test_unsynchronised_robots_all_finish(weights):
    """No barrier: chunks come due at random moments, the lead passes between threads."""
    w, batcher = batched(weights, max_batch=2, gather_s=0.0)
    policies = [w.new_policy() for _ in range(4)]
    results, errors = in_threads(lambda i: episode(policies[i], i, chunks=3), 4)
    assert not errors and all(len(r) == 3 for r in results)
    assert sum(size * n for size, n in batcher.batch_sizes.items()) == 12
    assert max(batcher.batch_sizes) <= 2


def test_other_operating_points_never_share_a_batch(weights):
    w, batcher = batched(weights)
    policies = [w.new_policy() for _ in range(2)]
    start = threading.Barrier(2)
    points = ["released", "fast"]
    _, errors = in_threads(lambda i: episode(policies[i], i, chunks=2, start=start, operating_point=points[i]), 2)
    assert not errors
    assert dict(batcher.batch_sizes) == {1: 4}


def test_a_failed_batch_fails_its_robots_and_the_batcher_goes_on(weights, monkeypatch):
    w, batcher = batched(weights)
    policies = [w.new_policy() for _ in range(2)]
    real_run = batcher._run
    calls = []

    def failing_once(group):
        calls.append(len(group))
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real_run(group)

    monkeypatch.setattr(batcher, "_run", failing_once)
    start = threading.Barrier(2)

    def first_chunk(i):
        policies[i].reset("task", seed=i)
        start.wait()
        return policies[i].act(images(i))

    results, errors = in_threads(first_chunk, 2)
    assert [str(e) for e in errors] == ["out of memory (simulated)"] * 2
    # The next batch runs: a reset episode acts again.
    results, errors = in_threads(first_chunk, 2)
    assert not errors and all(r is not None for r in results)


def test_ring_reads_equal_the_live_entries():
    """A batch reads whole quarters of the ring under the live-slot mask: the same attention as the
    live entries alone, while filling, after an eviction and once full."""
    torch.manual_seed(0)
    cache = KVCache(num_layers=1, batch=1, capacity=40, heads=2, head_dim=8, dtype=torch.float32, device="cpu")
    q = torch.randn(1, 6, 2, 8)
    extents = []
    for length, keep in [(7, True), (6, False), (12, True), (10, True), (9, True), (6, False), (3, True), (40, True)]:
        w = cache.begin(length, keep=keep, ring=True)
        k, v = torch.randn(1, length, 2, 8), torch.randn(1, length, 2, 8)
        cache.store(0, w, k, v)
        keys, values, _ = cache.read(0)  # the live entries, compacted
        ring_k, ring_v, mask = cache.read(0, static=True, ring=True)
        extents.append((cache.ring_extent(), mask is None))
        torch.testing.assert_close(attention(q, ring_k, ring_v, mask), attention(q, keys, values), rtol=0, atol=1e-6)
        cache.end(w)
    # Quarters of 10 while filling; the whole ring, unmasked while full (the temporary write that evicted)
    # and masked once entries are gone after an eviction.
    assert extents == [(10, False), (20, False), (20, False), (30, False), (40, False), (40, True), (40, False),
                       (40, True)]
