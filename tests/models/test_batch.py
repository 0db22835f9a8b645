"""Several robots' action steps as one batch (models/batch.py): each robot's chunks equal its chunks run alone,
only compatible action phases share a batch, a failure reaches every robot of its batch and no other, the
reads a batch's row table makes of a cache equal the live entries, and (by Triton's interpreter) the batch read
through row tables equals each robot alone."""

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
    # A batch of three gathers until the three are queued (at most 5 s): robots in step share it on a loaded
    # machine too, where a 50 ms window split them.
    w, batcher = batched(weights, max_batch=3, gather_s=5.0)
    policies = [w.new_policy() for _ in range(3)]
    start = threading.Barrier(3)
    together, errors = in_threads(lambda i: episode(policies[i], i, start=start), 3)
    assert not errors
    # 4 chunks: from the second on, each one batch of the 3 robots. The first robot's first phase ran alone: no
    # other robot had been active yet (ACTIVE_S), so it did not wait.
    assert batcher.batch_sizes[3] == 3 and sum(n * k for n, k in batcher.batch_sizes.items()) == 12
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


def test_other_action_settings_never_share_a_batch(weights):
    w, batcher = batched(weights, gather_s=1.0)
    policies = [w.new_policy() for _ in range(2)]
    start = threading.Barrier(2)
    points = ["released", "paper"]  # 4 and 10 action steps (the tiny preset)
    _, errors = in_threads(lambda i: episode(policies[i], i, chunks=2, start=start, operating_point=points[i]), 2)
    assert not errors
    assert dict(batcher.batch_sizes) == {1: 4}


def test_other_video_settings_share_the_action_steps(weights):
    """`fast` differs from `released` in its video steps only (the tiny preset): their action phases batch, and
    each robot's chunks are still its own."""
    alone = [episode(weights.new_policy(), i, chunks=3, operating_point=p) for i, p in enumerate(["released", "fast"])]
    w, batcher = batched(weights, max_batch=2, gather_s=5.0)
    policies = [w.new_policy() for _ in range(2)]
    start = threading.Barrier(2)
    points = ["released", "fast"]
    together, errors = in_threads(lambda i: episode(policies[i], i, chunks=3, start=start, operating_point=points[i]), 2)
    assert not errors
    assert batcher.batch_sizes[2] >= 2  # the chunks after the first (see above)
    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            assert np.abs(x - y).max() < 1e-5


def test_a_failed_batch_fails_its_robots_and_the_batcher_goes_on(weights, monkeypatch):
    w, batcher = batched(weights, gather_s=2.0)
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

    for _ in range(3):  # robots not yet active may run alone (no batch: nothing fails) until both are
        results, errors = in_threads(first_chunk, 2)
        if calls:
            break
        assert not errors
    assert calls == [2]
    assert [str(e) for e in errors] == ["out of memory (simulated)"] * 2
    # The next batch runs: a reset episode acts again.
    results, errors = in_threads(first_chunk, 2)
    assert not errors and all(r is not None for r in results)


def test_row_extent_reads_equal_the_live_entries():
    """A batch reads a cache's first `row_extent` slots, under the live-slot flags where it says so: the same
    attention as the live entries alone, while filling, after an eviction and once full."""
    torch.manual_seed(0)
    cache = KVCache(num_layers=1, batch=1, capacity=40, heads=2, head_dim=8, dtype=torch.float32, device="cpu")
    q = torch.randn(1, 6, 2, 8)
    extents = []
    for length, keep in [(7, True), (6, False), (12, True), (10, True), (9, True), (6, False), (3, True), (40, True)]:
        w = cache.begin(length, keep=keep, ring=True)
        k, v = torch.randn(1, length, 2, 8), torch.randn(1, length, 2, 8)
        cache.store(0, w, k, v)
        keys, values, _ = cache.read(0)  # the live entries, compacted
        n, masked = cache.row_extent()
        mask = cache.valid[:n].view(1, 1, 1, -1) if masked else None
        extents.append((n, masked))
        torch.testing.assert_close(attention(q, cache.k[0, :, :n], cache.v[0, :, :n], mask), attention(q, keys, values),
                                   rtol=0, atol=1e-6)
        cache.end(w)
    # The live prefix while filling; the whole ring, unflagged while full (the temporary write that evicted)
    # and flagged once entries are gone after an eviction.
    assert extents == [(7, False), (13, False), (19, False), (29, False), (38, False), (40, False), (40, True),
                       (40, False)]


TABLED = r"""
import dataclasses, json, threading
import numpy as np
from vaops.models.batch import ChunkBatcher
from vaops.models.checkpoint import build_random_weights
from vaops.models.config import get_preset

tiny = get_preset("tiny")
preset = dataclasses.replace(tiny, transformer=dataclasses.replace(tiny.transformer, attention_head_dim=32))
weights = build_random_weights(preset, seed=0)
weights = dataclasses.replace(weights, backend="splitkv")
CHECKS


def run(w, n, **kw):
    policies = [w.new_policy() for _ in range(n)]
    start = threading.Barrier(n) if n > 1 else None
    out = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, episode(policies[i], i, start=start, **kw)))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


alone = [run(weights, 1, chunks=3)[0]]
alone += [episode(weights.new_policy(), i, chunks=3) for i in (1, 2)]
w = dataclasses.replace(weights, batcher=ChunkBatcher(max_batch=3, gather_s=5.0))
together = run(w, 3, chunks=3)
diff = max(float(np.abs(x - y).max()) for a, b in zip(alone, together) for x, y in zip(a, b))
print(json.dumps({"sizes": dict(w.batcher.batch_sizes), "diff": diff,
                  "distinct": not np.allclose(together[0][1], together[1][1])}))
"""


def test_a_batch_read_through_row_tables_equals_each_robot_alone():
    """The GPU's batched path (one kernel a layer reads every robot's cache and prompt through a row table,
    models/split_kv.py), run by Triton's interpreter on a CPU: three robots' episodes, their caches filling
    and evicting, against each run alone (and with no batcher) in the same process. The tiny preset with a
    head dim of 32: the kernel takes powers of two (its 24 reads as the CPU's batches do)."""
    import inspect
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    checks = "\n".join(inspect.getsource(f) for f in (images, episode)).replace("PRESET", "preset")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", TABLED.replace("CHECKS", checks)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    # From the second chunk on, each chunk's action phase is one batch of the three robots (the first robot's
    # first phase ran alone: no other robot had been active yet).
    assert r["sizes"].get("3", 0) >= 2 and sum(int(n) * k for n, k in r["sizes"].items()) == 9
    assert r["diff"] < 1e-5
    assert r["distinct"]


def test_row_tables_refuse_what_the_kernels_cannot_read():
    """The checks made before any kernel runs (none of which a client can reach: the engines make these tensors):
    keys of another dtype than the batch's, keys or anchors off the 16-element grid the kernels' vectorised loads
    assume, caches of two layouts in one batch, and a row table of the wrong shape."""
    pytest.importorskip("triton")
    from vaops.models.batch import RowTables
    from vaops.models.split_kv import ROW_FIELDS, split_kv_rows

    tables = RowTables(torch.device("cpu"), torch.float32)
    buf = torch.zeros(4096)
    first = (-(buf.data_ptr() - tables.anchor.data_ptr()) // 4) % 16  # buf's first element on the anchor's grid
    aligned = buf[first:]
    assert tables.offset(aligned) * 4 == aligned.data_ptr() - tables.anchor.data_ptr()
    with pytest.raises(ValueError, match="must start at whole multiples of 16 elements"):
        tables.offset(buf[first + 1:])
    with pytest.raises(ValueError, match="a batch reads torch.float32 keys, got torch.bfloat16"):
        tables.offset(aligned.bfloat16())

    def engine(window):  # a robot's engine with a cache of this window, mid-episode
        preset = dataclasses.replace(PRESET, sampling=dataclasses.replace(PRESET.sampling, attn_window=window))
        policy = build_random_weights(preset, seed=0).new_policy()
        policy.reset("pick", seed=0)
        return policy.engine

    engines = [engine(PRESET.sampling.attn_window), engine(PRESET.sampling.attn_window + 2)]
    pending = [e.live_cache.begin(8, keep=False) for e in engines]
    assert tables.cache(engines[:1], pending[:1], rows=1).shape == (PRESET.transformer.num_layers, 1, ROW_FIELDS.value)
    with pytest.raises(ValueError, match="a batch's caches need one layout"):
        tables.cache(engines, pending, rows=1)

    q, rows = torch.zeros(2, 4, 2, 16), torch.zeros(2, ROW_FIELDS.value, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"rows must be int64 \[2, 5\], got torch.int32"):
        split_kv_rows(q, aligned, aligned, torch.ones(16, dtype=torch.uint8), rows.int(), 16, (32, 16), (32, 16))
    with pytest.raises(ValueError, match="the anchors must lie at whole multiples of 16 elements"):
        split_kv_rows(q, buf[first + 1:], aligned, torch.ones(16, dtype=torch.uint8), rows, 16, (32, 16), (32, 16))
