"""Truncated video denoising: upstream's `video_exec_step` (the first k passes of the schedule) and
the paper's stop at a noise level. Checked on the golden model: the passes run at the right
timesteps, the cache pass at the truncated level, and the untruncated settings are the default."""

import dataclasses

import pytest
import torch
from test_engine_ahead import first_act, inputs, new_engine
from test_golden import engine_config, golden, model  # noqa: F401  (fixtures)

from vaops.models.config import SamplingConfig
from vaops.models.engine import InferenceEngine
from vaops.models.flow_matching import NUM_TRAIN_TIMESTEPS, Schedule, sampling_sigmas, shift_sigmas


def upstream_passes(steps: int, shift: float, exec_step: int) -> list[float]:
    """Upstream's video loop: the scheduler's timesteps padded with 0, cut to video_exec_step."""
    t = (sampling_sigmas(steps, shift) * NUM_TRAIN_TIMESTEPS).tolist() + [0.0]
    return t if exec_step == -1 else t[:exec_step]


@pytest.mark.parametrize("exec_step", [-1, 1, 3, 25, 26])
def test_exec_step_runs_upstreams_passes(exec_step):
    s = Schedule.make(25, 5.0, exec_step=exec_step)
    assert s.timesteps.tolist() + [s.final_timestep] == pytest.approx(upstream_passes(25, 5.0, exec_step))
    assert (s.after is None) == (exec_step in (-1, 26))


def test_stop_spreads_the_steps_down_to_the_level():
    s = Schedule.make(3, 5.0, stop=0.4)
    assert len(s.timesteps) == 3 and s.sigmas[0].item() == pytest.approx(1.0)
    assert s.final == 0.4 and s.after == 0.0
    assert sum(s.deltas()) == pytest.approx(0.4 - 1.0)  # Euler from noise 1 to 0.4
    # evenly spaced before the shift, as the full schedule is
    u = s.sigmas / (5.0 - 4.0 * s.sigmas)
    assert torch.diff(u).tolist() == pytest.approx([torch.diff(u)[0].item()] * 2)
    assert shift_sigmas(torch.tensor([1.0]), 5.0).item() == pytest.approx(1.0)


def passes(engine) -> list[tuple[str, float, bool]]:
    """(kind, timestep of the last frame, kept) of every transformer pass the engine makes."""
    seen = []
    forward = engine._forward

    def spy(kind, x, t, keep, predicted, cond_only):
        seen.append((kind, round(float(t[0, -1]), 3), keep))
        return forward(kind, x, t, keep, predicted, cond_only)

    engine._forward = spy
    return seen


def with_sampling(golden, model, **changes):  # noqa: F811
    cases, t = golden
    engine = new_engine(golden, model)
    cfg = dataclasses.replace(engine.config, sampling=dataclasses.replace(engine.config.sampling, **changes))
    engine = InferenceEngine(model, cfg)
    engine.reset(t["infer.in.prompt_emb"], t["infer.in.negative_emb"])
    return engine


def test_the_untruncated_settings_are_the_default(golden, model):  # noqa: F811
    _, t = golden
    steps = new_engine(golden, model).config.sampling.video_steps
    a = first_act(new_engine(golden, model), t)
    b = first_act(with_sampling(golden, model, video_exec_step=steps + 1), t)
    assert torch.equal(a.video, b.video) and torch.equal(a.actions, b.actions)


def test_truncated_engines_write_the_cache_at_the_truncated_level(golden, model):  # noqa: F811
    _, t = golden
    s = new_engine(golden, model).config.sampling
    engine = with_sampling(golden, model, video_exec_step=2)
    seen = passes(engine)
    chunk = first_act(engine, t)
    video = [p for p in seen if p[0] == "video"]
    assert [ts for _, ts, _ in video] == pytest.approx(upstream_passes(s.video_steps, s.video_shift, 2), abs=1e-3)
    assert [keep for _, _, keep in video] == [False, True]  # the second and last pass writes the cache
    assert torch.isfinite(chunk.video).all() and torch.isfinite(chunk.actions).all()

    engine = with_sampling(golden, model, video_stop=0.4)
    seen = passes(engine)
    first_act(engine, t)
    video = [p for p in seen if p[0] == "video"]
    assert len(video) == s.video_steps + 1 and video[-1] == ("video", pytest.approx(400.0, abs=1e-3), True)


@pytest.mark.parametrize("grounded", [False, True], ids=["naive", "grounded"])
def test_a_truncated_chunk_computed_ahead_is_rewritten_as_its_final_pass_wrote_it(golden, model, grounded):  # noqa: F811
    """After an observation the chunk computed ahead is written again after it (and a grounded one re-imagined). With
    the paper's stop at s = 0.6 its final pass wrote the video at that level (what its own action passes read); the
    rewrite writes the same latents at the same timestep, not the video stepped past it to t = 0 (which the chunk
    returns, as upstream does)."""
    _, t = golden
    engine = with_sampling(golden, model, video_stop=0.4)
    final_t = engine.video_schedule.final_timestep
    first_act(engine, t)
    vn1, an1, o0, oa0 = inputs(t, 1)
    seen = []
    forward = engine._forward

    def spy(kind, x, tvec, keep, predicted, cond_only):
        seen.append((kind, x.clone(), tvec.clone(), keep))
        return forward(kind, x, tvec, keep, predicted, cond_only)

    engine._forward = spy
    chunk1 = engine.act_ahead(video_noise=vn1, action_noise=an1)
    written = [(x, tv) for kind, x, tv, keep in seen if kind == "video" and keep]
    assert len(written) == 1 and torch.equal(written[0][0], chunk1.cached_video)
    assert chunk1.cached_t == pytest.approx(final_t) and torch.all(written[0][1] == chunk1.cached_t)
    assert not torch.equal(chunk1.video, chunk1.cached_video)  # stepped once more, from s = 0.6 to the end

    engine.observe(o0, oa0)
    seen.clear()
    vn2, an2, _, _ = inputs(t, 2)
    engine.act_ahead(video_noise=vn2, action_noise=an2, grounded=grounded)
    if grounded:  # the grounding pass writes the executing chunk's actions, re-imagines its video, writes both again
        rewritten = engine.grounded
        assert rewritten.cached_video is not None and not torch.equal(rewritten.cached_video, chunk1.cached_video)
        at = [i for i, (kind, x, _, keep) in enumerate(seen) if kind == "video" and keep and x is not None
              and torch.equal(x, rewritten.cached_video)]
        assert len(at) == 2  # the re-imagining's final pass, then the rewrite after the dropped entries
        kind, x, tv, keep = seen[at[1]]
    else:
        kind, x, tv, keep = seen[0]
        assert torch.equal(x, chunk1.cached_video)
    assert kind == "video" and keep and torch.all(tv == final_t)
    kind, x, tv, keep = seen[at[1] + 1] if grounded else seen[1]
    assert kind == "action" and keep and torch.all(tv == 0) and torch.equal(x, chunk1.actions * engine.action_mask)


@pytest.mark.parametrize("changes, message", [
    ({"video_exec_step": 0}, "video_exec_step 0 must be -1 or 1..26"),
    ({"video_exec_step": 27}, "video_exec_step 27"),
    ({"video_stop": 1.0}, r"video_stop 1.0 must be in \[0, 1\)"),
    ({"video_stop": 0.4, "video_exec_step": 3}, "not both"),
])
def test_bad_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**changes)
