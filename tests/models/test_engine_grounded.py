"""Grounded asynchronous execution in the engine (the paper's section 3.4): while chunk t+1 executes,
`act_ahead(grounded=True)` re-imagines its video from the observed history (up to chunk t) and its
actions, caches that in place of the stale forecast, then predicts chunk t+2. Checked on the golden
model against an explicit construction with the same noise, and for what the re-imagined video
depends on; naive and synchronous chunks are pinned by test_engine_ahead.py and test_golden.py."""

import dataclasses

import pytest
import torch
from test_engine_ahead import ahead_then_observed, first_act, inputs, max_diff
from test_golden import engine_config, golden, model  # noqa: F401  (fixtures)

from vaops.models.engine import InferenceEngine


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matrices: on a busy 2-core machine OpenMP's spinning barriers made 2 threads 20x slower (92 s
    against 4.4 s for this module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def new_engine(golden, model, window=1000):  # noqa: F811
    cases, t = golden
    cfg = engine_config(cases)
    # Few steps: what is checked here does not depend on their number (test time 25 s -> 3 s).
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, attn_window=window, video_steps=3,
                                                                action_steps=3))
    engine = InferenceEngine(model, cfg)
    engine.reset(t["infer.in.prompt_emb"], t["infer.in.negative_emb"])
    return engine


def ground_noise(engine, seed=7):
    c = engine.config
    shape = (1, engine.model.config.in_channels, c.frame_chunk_size, c.latent_height, c.latent_width)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def live(engine):
    """Every layer's live keys and values, in ring order."""
    return [torch.cat(engine.cache.live(layer, slice(None))) for layer in range(engine.model.config.num_layers)]


def grounded_episode(golden, model, obs0=None, actions1=None):  # noqa: F811
    """Chunk 0 by act, chunk 1 computed ahead, chunk 0 observed, then chunk 2 computed ahead with
    grounding (chunk 1's actions optionally replaced before it, as if the robot executed those)."""
    _, t = golden
    vn2, an2, _, _ = inputs(t, 2)
    engine = new_engine(golden, model)
    chunk1 = ahead_then_observed(engine, t, obs0)
    if actions1 is not None:
        engine._executing = dataclasses.replace(engine._executing, actions=actions1)
    chunk2 = engine.act_ahead(video_noise=vn2, action_noise=an2, grounded=True, ground_noise=ground_noise(engine))
    return engine, chunk1, chunk2


def test_grounding_caches_the_executing_chunk_reimagined_from_the_observation_and_its_actions(golden, model):  # noqa: F811
    _, t = golden
    _, _, o0, oa0 = inputs(t, 0)
    vn2, an2, _, _ = inputs(t, 2)
    engine, chunk1, chunk2 = grounded_episode(golden, model)
    fc = engine.config.frame_chunk_size
    assert engine.grounded.frame_offset == chunk1.frame_offset and chunk2.frame_offset == chunk1.frame_offset + fc
    assert torch.equal(engine.grounded.actions, chunk1.actions)

    # Explicit construction, synchronous from chunk 0's observation: chunk 1's executed actions
    # written after the observed history, its video denoised from the same noise attending to both,
    # then [that video, those actions] cached at t=0 as the chunk's predicted entries.
    ref = new_engine(golden, model)
    first_act(ref, t)
    ref.observe(o0, oa0)
    history = ref.cache.tail
    zeros = torch.zeros(1, fc)
    ref._forward("action", chunk1.actions, zeros, keep=True, predicted=True, cond_only=False)
    video, cached = ref._denoise("video", ground_noise(ref), ref.video_schedule, ref.config.sampling.guidance_scale,
                                 None)
    assert cached is None and engine.grounded.cached_video is None  # the golden schedule is not truncated
    assert torch.equal(video, engine.grounded.video)
    ref.cache.drop_predicted()
    assert ref.cache.tail == history
    ref._forward("video", video, zeros, keep=True, predicted=True, cond_only=False)
    ref._forward("action", chunk1.actions, zeros, keep=True, predicted=True, cond_only=False)
    ref.frame_offset += fc
    expected = ref._act(None, vn2, an2, None, ahead=True)  # as a chunk computed ahead: its actions not cached
    assert torch.equal(chunk2.video, expected.video) and torch.equal(chunk2.actions, expected.actions)
    assert ref.cache.tail == engine.cache.tail and ref.cache.predicted_from == engine.cache.predicted_from
    assert all(torch.equal(a, b) for a, b in zip(live(engine), live(ref)))

    # The stale forecast is gone: chunk 2 is not the naive one.
    naive = new_engine(golden, model)
    first_act(naive, t)
    naive.act_ahead(*inputs(t, 1)[:2])
    naive.observe(o0, oa0)
    assert max_diff(naive.act_ahead(video_noise=vn2, action_noise=an2).video, chunk2.video) > 1e-3
    assert max_diff(engine.grounded.video, chunk1.video) > 1e-3


def test_the_reimagined_video_depends_on_the_observation_and_the_executing_actions(golden, model):  # noqa: F811
    _, t = golden
    _, _, o0, _ = inputs(t, 0)
    base, chunk1, _ = grounded_episode(golden, model)
    other_obs, _, _ = grounded_episode(golden, model, obs0=o0.flip(-1))
    other_actions, _, _ = grounded_episode(golden, model, actions1=chunk1.actions.flip(3))
    assert max_diff(other_obs.grounded.video, base.grounded.video) > 1e-3
    assert max_diff(other_actions.grounded.video, base.grounded.video) > 1e-3


def test_grounding_after_a_synchronous_act_changes_nothing(golden, model):  # noqa: F811
    """The chunk an act computed was imagined from the latest observation: nothing is stale."""
    _, t = golden
    chunks = []
    for grounded in (False, True):
        engine = new_engine(golden, model)
        first_act(engine, t)
        chunks.append(engine.act_ahead(*inputs(t, 1)[:2], grounded=grounded))
        assert engine.grounded is None
    assert torch.equal(chunks[0].video, chunks[1].video) and torch.equal(chunks[0].actions, chunks[1].actions)


@pytest.mark.parametrize("window", [4, 6])
def test_grounding_keeps_the_same_history_as_naive_under_eviction(golden, model, window):  # noqa: F811
    """A ring of window//2 chunks: the grounding pass writes at most one chunk beyond the history, so the
    ring evicts exactly what the naive loop evicts and the episode goes on."""
    _, t = golden
    runs = {}
    for grounded in (False, True):
        engine = new_engine(golden, model, window)
        first_act(engine, t)
        generator = torch.Generator().manual_seed(3)
        state = []
        for c in range(1, 6):
            engine.act_ahead(generator=generator, grounded=grounded)
            _, _, obs, obs_act = inputs(t, (c - 1) % 4)
            engine.observe(obs, obs_act)
            state.append((engine.cache.head, engine.cache.tail, engine.cache.predicted_from, engine.frame_offset))
        runs[grounded] = state
    assert runs[True] == runs[False]
    assert runs[True][-1][0] > 0  # it evicted
