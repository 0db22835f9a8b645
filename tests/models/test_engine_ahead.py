"""Asynchronous execution in the engine: `act_ahead` computes the next chunk while the current one
runs, and `observe` grounds both. Checked against the synchronous loop on the golden model, with a
window wide enough that nothing is evicted (the chunk computed ahead takes one chunk of the window,
so under eviction the grounding pass sees one chunk less history than the synchronous loop's)."""

import collections
import dataclasses

import pytest
import torch
from test_golden import engine_config, golden, model  # noqa: F401  (fixtures)

from vaops.models.engine import InferenceEngine

TOL = 1e-5


def inputs(t, c):
    p = f"infer.in.chunk{c}."
    return t[p + "video_noise"], t[p + "action_noise"], t[p + "obs_latent"], t[p + "obs_action"]


def new_engine(golden, model, static_reads=False):  # noqa: F811
    cases, t = golden
    cfg = engine_config(cases)
    wide = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, attn_window=1000))
    engine = InferenceEngine(model, wide, cuda_graphs=static_reads)
    engine.reset(t["infer.in.prompt_emb"], t["infer.in.negative_emb"])
    return engine


def first_act(engine, t):
    vn, an, _, _ = inputs(t, 0)
    return engine.act(first_latent=t["infer.in.init_latent"], video_noise=vn, action_noise=an)


def max_diff(a, b):
    return (a - b).abs().max().item()


# Nothing is evicted here, so the static reads are the ring's live prefix (tests/models/test_kv_cache_reads.py
# covers the full and masked ring).
@pytest.mark.parametrize("static_reads", [False, True], ids=["compact-cache-reads", "static-prefix-reads"])
def test_ahead_equals_sync_when_the_robot_sees_what_was_imagined(golden, model, static_reads):  # noqa: F811
    """Observing exactly the imagined chunk writes the same keys/values as its predicted pass, so
    computing ahead must give the synchronous loop's chunks."""
    cases, t = golden
    chunks = cases["infer"]["chunks"]
    sync = new_engine(golden, model, static_reads)
    sync_chunks = [first_act(sync, t)]
    for c in range(1, chunks):
        sync.observe(sync_chunks[-1].video, sync_chunks[-1].actions)
        vn, an, _, _ = inputs(t, c)
        sync_chunks.append(sync.act(video_noise=vn, action_noise=an))

    fast = new_engine(golden, model, static_reads)
    executing = first_act(fast, t)
    assert max_diff(executing.actions, sync_chunks[0].actions) == 0
    for c in range(1, chunks):
        vn, an, _, _ = inputs(t, c)
        ahead = fast.act_ahead(video_noise=vn, action_noise=an)
        assert ahead.frame_offset == sync_chunks[c].frame_offset
        fast.observe(executing.video, executing.actions)
        assert fast.frame_offset == ahead.frame_offset
        assert max_diff(ahead.video, sync_chunks[c].video) <= TOL, f"chunk {c} video"
        assert max_diff(ahead.actions, sync_chunks[c].actions) <= TOL, f"chunk {c} actions"
        executing = ahead


def ahead_then_observed(engine, t, obs0=None):
    """Chunk 0 by act, chunk 1 computed ahead, then chunk 0 observed (`obs0`: its latents, by default
    the golden ones); returns chunk 1."""
    _, _, o0, oa0 = inputs(t, 0)
    vn1, an1, _, _ = inputs(t, 1)
    first_act(engine, t)
    chunk1 = engine.act_ahead(video_noise=vn1, action_noise=an1)
    engine.observe(o0 if obs0 is None else obs0, oa0)
    return chunk1


def test_grounding_replaces_the_imagined_chunk_by_the_observation(golden, model):  # noqa: F811
    """Chunk 2 computed ahead must see [observed chunk 0, imagined chunk 1], not imagined chunk 0."""
    _, t = golden
    _, _, obs0, obs_act0 = inputs(t, 0)
    vn2, an2, _, _ = inputs(t, 2)

    fast = new_engine(golden, model)
    chunk1 = ahead_then_observed(fast, t)
    chunk2 = fast.act_ahead(video_noise=vn2, action_noise=an2)

    ref = new_engine(golden, model)
    first_act(ref, t)
    ref.observe(obs0, obs_act0)
    ref.observe(chunk1.video, chunk1.actions)
    expected = ref.act(video_noise=vn2, action_noise=an2)
    assert chunk2.frame_offset == expected.frame_offset
    assert max_diff(chunk2.video, expected.video) <= TOL
    assert max_diff(chunk2.actions, expected.actions) <= TOL

    # Without grounding (imagined chunk 0 kept) the chunk differs: the observation really counts.
    stale = new_engine(golden, model)
    c0 = first_act(stale, t)
    stale.observe(c0.video, c0.actions)
    stale.observe(chunk1.video, chunk1.actions)
    assert max_diff(stale.act(video_noise=vn2, action_noise=an2).video, expected.video) > 1e-3


def test_ahead_misuse_is_refused(golden, model):  # noqa: F811
    _, t = golden
    engine = new_engine(golden, model)
    with pytest.raises(RuntimeError, match="act_ahead follows an act"):
        engine.act_ahead()
    first_act(engine, t)
    engine.act_ahead()
    with pytest.raises(RuntimeError, match="observe the executing chunk"):
        engine.act()
    with pytest.raises(RuntimeError, match="act_ahead follows an act"):
        engine.act_ahead()
    _, _, obs0, obs_act0 = inputs(t, 0)
    with pytest.raises(ValueError, match="must cover the executing chunk's 2 frames, got 1"):
        engine.observe(obs0[:, :, :1], obs_act0[:, :, :1])
    engine.observe(obs0, obs_act0)  # the refused call left the state intact
    assert engine.frame_offset == engine.config.frame_chunk_size  # where the chunk computed ahead sits


def test_synchronous_episode_skips_the_predicted_actions_pass_and_changes_nothing(golden, model):  # noqa: F811
    """An episode reset as synchronous observes each chunk before the next act, so the pass that caches a
    chunk's predicted actions (dropped unread by the observation) is skipped: the same chunks, bit for
    bit, one action pass fewer per chunk; computing ahead and continuing from imagination are refused."""
    cases, t = golden
    runs = {}
    for synchronous in (False, True):
        engine = new_engine(golden, model)
        engine.reset(t["infer.in.prompt_emb"], t["infer.in.negative_emb"], synchronous=synchronous)
        passes = []
        forward = engine._forward
        engine._forward = lambda kind, *a, **k: passes.append(kind) or forward(kind, *a, **k)
        chunks = [first_act(engine, t)]
        for c in range(1, cases["infer"]["chunks"]):
            _, _, obs_latent, obs_action = inputs(t, c - 1)
            engine.observe(obs_latent, obs_action)
            vn, an, _, _ = inputs(t, c)
            chunks.append(engine.act(video_noise=vn, action_noise=an))
        runs[synchronous] = chunks, passes, engine
    (full, full_passes, _), (sync, sync_passes, engine) = runs[False], runs[True]
    for a, b in zip(full, sync):
        assert max_diff(a.video, b.video) == 0 and max_diff(a.actions, b.actions) == 0
    assert full_passes.count("video") == sync_passes.count("video")
    assert full_passes.count("action") - sync_passes.count("action") == len(full)
    with pytest.raises(RuntimeError, match="reset as synchronous"):
        engine.act_ahead()
    with pytest.raises(RuntimeError, match="reset as synchronous"):
        engine.advance()


@pytest.mark.parametrize("grounded", [False, True], ids=["naive", "grounded"])
def test_a_chunk_computed_ahead_skips_the_cache_pass_its_observation_overwrites(golden, model, grounded):  # noqa: F811
    """The observe after act_ahead drops the chunk's predicted entries and rewrites them, so act_ahead does
    not cache its predicted actions (nor a grounding pass its final video where the schedule is whole):
    the same chunks and cache as an engine that still runs those passes, with one action pass fewer a chunk
    computed ahead. The rewrite itself waits for the next act_ahead, off the observation's round trip."""
    cases, t = golden
    chunks = cases["infer"]["chunks"]

    def episode(engine):
        passes = []
        forward = engine._forward
        engine._forward = lambda kind, *a, **k: passes.append(kind) or forward(kind, *a, **k)
        executing = first_act(engine, t)
        out, counts = [executing], []
        for c in range(1, chunks):
            vn, an, _, _ = inputs(t, c)
            passes.clear()
            ahead = engine.act_ahead(video_noise=vn, action_noise=an, grounded=grounded,
                                     ground_noise=None if c == 1 else inputs(t, c - 1)[0].clone())
            counts.append(collections.Counter(passes))
            passes.clear()
            engine.observe(executing.video, executing.actions)
            # The observation's own passes only: the chunk computed ahead is written again after it by the
            # next act_ahead, or dropped unread by a grounded one.
            assert passes == ["video", "action"]
            out.append(ahead)
            executing = ahead
        return out, counts

    fast = new_engine(golden, model)
    every = new_engine(golden, model)  # as before: each chunk's actions cached, each last pass run
    every.caches_actions = lambda ahead: not every.synchronous
    denoise = every._denoise
    every._denoise = lambda kind, x, schedule, guidance, first, cache_last=True: denoise(kind, x, schedule, guidance,
                                                                                         first, True)
    got, counts = episode(fast)
    want, counts_every = episode(every)
    for c, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a.video, b.video) and torch.equal(a.actions, b.actions), f"chunk {c}"
    assert fast.cache.tail == every.cache.tail and fast.cache.predicted_from == every.cache.predicted_from
    for layer in range(fast.model.config.num_layers):
        assert all(torch.equal(a, b) for a, b in zip(fast.cache.live(layer, slice(None)), every.cache.live(layer, slice(None))))
    # Chunk 1 follows a synchronous act (nothing to re-imagine); later grounded ones also skip a video pass.
    saved = [every_n - n for n, every_n in zip(counts, counts_every)]
    v, a = len(fast.video_schedule.sigmas), fast.config.sampling.action_steps  # a whole video schedule here
    later = (collections.Counter(video=2 * v + 2, action=a + 2) if grounded  # grounding, its t=0 write, the chunk
             else collections.Counter(video=v + 2, action=a + 1))  # the rewrite after the observation, the chunk
    assert counts == [collections.Counter(video=v + 1, action=a)] + [later] * (chunks - 2)
    assert saved == [collections.Counter(action=1)] + [collections.Counter(action=1, video=int(grounded))] * (chunks - 2)
