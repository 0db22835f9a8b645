"""Static cache reads (what CUDA graphs capture): the live prefix while the ring fills, the whole ring
once full, the masked ring in any other state. On CPU the same reads run eagerly; a stand-in for
CapturedCall counts the graphs an engine would capture, keyed as on a GPU."""

import dataclasses

import numpy as np
import pytest
import torch
from test_golden import engine_config, golden, model  # noqa: F401  (fixtures)

import vaops.models.engine as engine_module
from vaops.models.attention import attention
from vaops.models.config import TransformerConfig, get_preset
from vaops.models.engine import EngineConfig, InferenceEngine
from vaops.models.kv_cache import KVCache
from vaops.models.transformer import build_transformer


class CountedCall:
    """CapturedCall's stand-in on CPU: runs the step eagerly; the engine's dict of them is its graphs."""

    def __init__(self, fn, inputs, pool=None, label=""):
        self.fn, self.label = fn, label

    def __call__(self, *inputs):
        return self.fn(*inputs)


@pytest.fixture
def counted(monkeypatch):
    monkeypatch.setattr(engine_module, "CapturedCall", CountedCall)


def graphed(engine: InferenceEngine) -> InferenceEngine:
    engine.cuda_graphs = True  # keyed and "captured" as on a GPU, by CountedCall
    return engine


# ----- the cache alone -----

def attend(q, kv):
    k, v, mask = kv
    return attention(q, k, v, mask)


def test_static_reads_match_the_compact_read_in_every_state():
    torch.manual_seed(0)
    cache = KVCache(num_layers=1, batch=2, capacity=10, heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    q = torch.randn(2, 3, 2, 4)
    seen = []

    def write(length, keep=True, predicted=False):
        w = cache.begin(length, keep=keep, predicted=predicted)
        k, v = torch.randn(2, length, 2, 4), torch.randn(2, length, 2, 4)
        cache.store(0, w, k, v)
        static, compact = cache.read(0, static=True), cache.read(0)
        seen.append(cache.static_extent())
        torch.testing.assert_close(attend(q, static), attend(q, compact), atol=1e-6, rtol=0)
        cache.end(w)
        return static

    k, _, mask = write(4)  # filling: the live prefix, no mask
    assert k.shape[1] == 4 and mask is None
    write(3, keep=False)  # a denoising step's temporary write, released
    k, _, mask = write(6, predicted=True)  # exactly full: the whole ring, no mask
    assert k.shape[1] == 10 and mask is None
    cache.drop_predicted()
    k, _, mask = write(3)  # entries dropped, nothing evicted yet: still a prefix
    assert k.shape[1] == 7 and mask is None
    write(6, predicted=True)  # evicts three: full again
    cache.drop_predicted()
    k, _, mask = write(2)  # evicted and not full: the masked ring
    assert cache.head > 0 and k.shape[1] == 10 and mask is not None and mask.sum() == len(cache)
    assert seen == [4, 7, 10, 7, 10, None]  # the last write's own entries land in the ring's last free-count slots


def test_packed_reads_match_the_compact_read_in_random_episodes(monkeypatch):
    """Evicted and not full: the pass first packs the live entries into a prefix (models/kv_cache.py
    `_pack`), copying those among the last slots into free ones, or, where its own new entries would land
    there, reads under the mask. Random writes, releases and drops over a ring of 12: every read
    attends as the live entries alone, and packing ran with copies, without (the free run was already
    last) and gave way to the mask."""
    g = torch.Generator().manual_seed(0)
    cache = KVCache(num_layers=2, batch=2, capacity=12, heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    q = torch.randn(2, 3, 2, 4, generator=g)
    copies, kinds = [], set()
    pack = KVCache._pack

    def counted_pack(self, w):
        before = self.k.clone()
        pack(self, w)
        copies.append(not torch.equal(before, self.k))

    monkeypatch.setattr(KVCache, "_pack", counted_pack)
    for step in range(300):
        r = torch.rand((), generator=g).item()
        if r < 0.2:
            cache.drop_predicted()
            continue
        length = int(torch.randint(1, 6, (), generator=g))
        keep, predicted = r < 0.7, r < 0.45
        copies.clear()
        w = cache.begin(length, keep=keep, predicted=predicted)
        for layer in range(2):
            k, v = torch.randn(2, length, 2, 4, generator=g), torch.randn(2, length, 2, 4, generator=g)
            cache.store(layer, w, k, v)
            static = cache.read(layer, static=True)
            torch.testing.assert_close(attend(q, static), attend(q, cache.read(layer)), atol=1e-6, rtol=0)
        extent = cache.static_extent()
        if cache.head > 0 and not cache.full:
            kinds.add("masked" if extent is None else "packed, copied" if copies[0] else "packed, in place")
            assert extent in (None, len(cache)) and (extent is None) == (static[2] is not None)
        cache.end(w)
    assert kinds == {"masked", "packed, copied", "packed, in place"}


# ----- an episode -----

def noise(engine, gen):
    c, m = engine.config, engine.model.config
    video = torch.randn(1, m.in_channels, c.frame_chunk_size, c.latent_height, c.latent_width, generator=gen)
    actions = torch.randn(1, m.action_dim, c.frame_chunk_size, c.action_per_frame, 1, generator=gen)
    return video, actions


def episode(engine, t, chunks, reads=None):
    """Act and observe (the chunk as imagined, perturbed so that observing counts) for `chunks` chunks,
    from fixed noise; `reads` collects each static read's extent per chunk."""
    gen = torch.Generator().manual_seed(1)
    engine.reset(t["infer.in.prompt_emb"], t["infer.in.negative_emb"])
    read = engine.cache.read
    if reads is not None:
        engine.cache.read = lambda *a, **k: reads[-1].add(engine.cache.static_extent()) or read(*a, **k)
    out = []
    for c in range(chunks):
        if reads is not None:
            reads.append(set())
        vn, an = noise(engine, gen)
        chunk = engine.act(first_latent=t["infer.in.init_latent"] if c == 0 else None, video_noise=vn,
                           action_noise=an)
        out.append(chunk)
        engine.observe(chunk.video + 0.1 * vn, chunk.actions)
    engine.cache.read = read
    return out


def windowed(cases, window):
    cfg = engine_config(cases)
    return dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, attn_window=window))


def test_static_read_episode_equals_the_compact_read_episode(golden, model):  # noqa: F811
    """Through the filling phase (prefix reads: the very views the compact read returns, so equal to
    the bit), past the point where the ring is full and into eviction (full reads, and each observation
    after an eviction read as the packed prefix of the ring's live entries, within float tolerance)."""
    cases, t = golden
    cfg = windowed(cases, 8)  # a ring of 4 chunks: filled by chunk 3, evicting from chunk 4
    reads = []
    static = episode(InferenceEngine(model, cfg, cuda_graphs=True), t, 7, reads)
    compact = episode(InferenceEngine(model, cfg), t, 7)
    capacity = 4 * 20  # 4 chunks of 12 video + 8 action tokens
    for c in range(4):  # filling: prefixes, the last action read being the full ring
        assert None not in reads[c] and reads[c] <= set(range(1, capacity + 1)), (c, reads[c])
    assert capacity in reads[3] and all(reads[c] == {capacity, capacity - 8} for c in range(4, 7))
    masked_from = 4  # chunk 4's observation is the first packed read (8 action entries evicted)
    for c, (s, e) in enumerate(zip(static, compact)):
        for name in ("video", "actions"):
            diff = (getattr(s, name) - getattr(e, name)).abs().max().item()
            if c <= masked_from:
                assert diff == 0, f"chunk {c} {name}: {diff}"
            else:
                assert diff <= 1e-5, f"chunk {c} {name}: {diff}"


def test_graphs_per_episode_and_their_bound(golden, model, counted, monkeypatch):  # noqa: F811
    """3 per level while the ring of C chunks fills (video at CFG batch 2; actions at batch 1 for the
    steps and 2 for the cache pass), less the last action level, which is the full ring: 3C + 1 with
    the full ring's 3. The observation after an eviction reads the packed prefix as the last filling
    level's observation does, with its graph. Past MAX_GRAPHS new shapes run eagerly."""
    cases, t = golden
    cfg = windowed(cases, 8)
    engine = graphed(InferenceEngine(model, cfg, cuda_graphs=True))
    first = episode(engine, t, 7)
    assert len(engine._graphs) == 3 * 4 + 1
    assert all(key[3] is not None for key in engine._graphs)  # no masked read
    # each labelled with its key: the server's capture hook names the shape behind a stall (serving/metrics.py)
    assert all(call.label == f"engine {key}" for key, call in engine._graphs.items())
    again = episode(engine, t, 7)  # a second episode reuses them all
    assert len(engine._graphs) == 3 * 4 + 1
    for a, b in zip(first, again):
        assert torch.equal(a.actions, b.actions) and torch.equal(a.video, b.video)

    monkeypatch.setattr(engine_module, "MAX_GRAPHS", 5)
    bounded = graphed(InferenceEngine(model, cfg, cuda_graphs=True))
    for a, b in zip(episode(bounded, t, 7), first):
        assert torch.equal(a.actions, b.actions) and torch.equal(a.video, b.video)
    assert len(bounded._graphs) == 5


def test_warm_up_runs_every_level_of_the_robotwin_ring(counted):
    """The robotwin layout (24x20 latents, 240 video + 32 action tokens a chunk, window 72: a ring of
    36 chunks, 9,792 slots) on a one-layer model: the warm-up's pass over the levels captures the 109
    graphs of an episode, and an episode after it (filling, full, evicting) captures none."""
    preset = get_preset("robotwin")
    tiny = TransformerConfig(num_layers=1, num_attention_heads=1, attention_head_dim=24, ffn_dim=32, text_dim=16,
                             freq_dim=32)
    cfg = EngineConfig.from_preset(preset)
    engine = graphed(InferenceEngine(build_transformer(tiny, seed=0), cfg, cuda_graphs=True))
    engine.set_sampling(dataclasses.replace(cfg.sampling, video_steps=2, action_steps=2))
    first = torch.zeros(1, tiny.in_channels, 1, *preset.latent_hw)

    def start():
        engine.reset(torch.randn(1, 5, tiny.text_dim), torch.randn(1, 5, tiny.text_dim))
        video = engine.act(first_latent=first).video
        engine.observe(video, torch.zeros(1, tiny.action_dim, 2, preset.action_per_frame, 1))

    start()
    assert engine.cache.capacity == 9792
    assert engine.warm_up_cache_levels() == 36  # chunks 1-36; the 36th evicts, its observation reads packed
    assert len(engine._graphs) == 109
    assert engine.config.sampling.video_steps == 2  # the session's settings are back
    start()
    for _ in range(37):  # the 36th evicts, the 37th runs on the evicted ring
        chunk = engine.act()
        engine.observe(chunk.video, chunk.actions)
    assert engine.cache.head > 0 and len(engine._graphs) == 109
    # Grounded asynchronous execution adds the forward-dynamics passes' own levels, well within MAX_GRAPHS.
    engine.reset(torch.randn(1, 5, tiny.text_dim), torch.randn(1, 5, tiny.text_dim))
    engine.act(first_latent=first)
    assert engine.warm_up_cache_levels(grounded=True) == 36
    # 71 more: 2 a filling level, and a read under the mask after the eviction (its new entries land among
    # the ring's last free-count slots, so it cannot be packed)
    assert len(engine._graphs) == 180 <= engine_module.MAX_GRAPHS
    engine.reset(torch.randn(1, 5, tiny.text_dim), torch.randn(1, 5, tiny.text_dim))
    engine.act(first_latent=first)
    for _ in range(4):  # an episode's first grounded levels (the tiny policy's test runs one through eviction)
        ahead = engine.act_ahead(grounded=True)
        engine.observe(ahead.video, ahead.actions)
    assert engine.grounded is not None and len(engine._graphs) == 180


def test_policy_warm_up_leaves_nothing_to_capture_in_the_first_episode(counted):
    from vaops.models.checkpoint import build_random_weights

    preset = get_preset("tiny")
    policy = build_random_weights(preset, seed=0).new_policy()
    graphed(policy.engine)
    assert policy.warm_up() == 4
    captured = len(policy.engine._graphs)
    assert policy.frame_offset == 0 and len(policy.engine.cache) == 0
    blank = {c.key: np.zeros((c.height, c.width, 3), np.uint8) for c in preset.cameras}
    chunks = preset.sampling.attn_window // 2 + 3  # fills, then evicts
    policy.reset("stack the cubes", seed=3)
    for c in range(chunks):
        chunk = policy.act(blank if c == 0 else None)
        frames = (preset.frame_chunk_size - (c == 0)) * preset.frames_per_latent
        policy.observe([blank] * frames, chunk.actions)
    assert policy.engine.cache.head > 0
    assert len(policy.engine._graphs) == captured
    # Grounded asynchronous execution: its forward-dynamics passes read the cache at levels of their own,
    # which the warm-up's grounded episode captured too (without it this episode captured 3 graphs).
    policy.reset("stack the cubes", seed=4)
    policy.act(blank)
    for c in range(chunks):
        ahead = policy.act_ahead(grounded=True)
        frames = (preset.frame_chunk_size - (c == 0)) * preset.frames_per_latent
        policy.observe([blank] * frames, ahead.actions)
    assert policy.engine.cache.head > 0 and policy.engine.grounded is not None
    assert len(policy.engine._graphs) == captured


def test_compiled_block_stores_its_keys_and_values_in_the_cache_itself():
    """The served path: the compiled attn_in region (inductor, here on the CPU) writes the new keys and
    values into this layer's ring slots at CachedSelfAttention.destination, in place, across the wrap
    of the ring and for the conditional half alone, as the eager region's returned k, v stored by copy."""
    from vaops.models.kv_cache import CachedSelfAttention
    from vaops.models.transformer import BlockRegions, _block_attn_in

    cfg = get_preset("tiny").transformer
    block = build_transformer(cfg, seed=0).blocks[1]
    heads = cfg.num_attention_heads
    dim, head_dim = cfg.inner_dim, cfg.attention_head_dim
    g = torch.Generator().manual_seed(0)
    x, mod = torch.randn(1, 6, dim, generator=g), torch.randn(1, 1, 6, dim, generator=g)
    cos, sin = torch.randn(6, head_dim // 2, generator=g), torch.randn(6, head_dim // 2, generator=g)
    caches = [KVCache(3, 2, 16, heads, head_dim, torch.float32, "cpu") for _ in range(2)]
    compiled = BlockRegions.compiled().attn_in
    for cache in caches:
        cache.begin(13, keep=True)  # the next write wraps: slots 13, 14, 15, 0, 1, 2
    for i, cache in enumerate(caches):
        pending = cache.begin(6, keep=False)
        attn = CachedSelfAttention(cache, pending, batch=slice(0, 1))
        if i == 0:  # eager, returned and stored by copy
            q0, k, v = _block_attn_in(block, x, mod, cos, sin)
            cache.store(1, pending, k, v, slice(0, 1))
        else:
            q1, k1, v1 = compiled(block, x, mod, cos, sin, attn.destination(1))
    assert k1 is None and v1 is None and pending.slots.tolist() == [13, 14, 15, 0, 1, 2]
    torch.testing.assert_close(q1, q0, rtol=1e-5, atol=1e-5)
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert b[1, 0, [13, 14, 15, 0, 1, 2]].abs().amin() > 0 and b[1, 1].abs().max() == 0  # written there only
        assert b[[0, 2]].abs().max() == 0
    with pytest.raises(ValueError, match="kept cache write must cover the whole batch"):
        CachedSelfAttention(caches[0], caches[0].begin(2, keep=True), batch=slice(0, 1)).destination(0)
