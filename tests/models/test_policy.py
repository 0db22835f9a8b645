import json

import numpy as np
import pytest

from vaops.models.checkpoint import build_random_weights, load_policy, write_tiny_checkpoint
from vaops.models.config import get_preset
from vaops.models.policy import denormalize_actions, normalize_actions


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", seed=1)


def images(preset, seed):
    rng = np.random.default_rng(seed)
    return {c.key: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in preset.cameras}


def run_episode(policy, chunks=3, seed=0):
    policy.reset("transfer the cube", seed=seed)
    preset = policy.preset
    out = []
    for c in range(chunks):
        chunk = policy.act(images(preset, 100) if c == 0 else None)
        out.append(chunk.actions)
        latent_frames = preset.frame_chunk_size - (1 if c == 0 else 0)
        keyframes = [images(preset, 200 + c * 10 + i) for i in range(latent_frames * preset.frames_per_latent)]
        policy.observe(keyframes, chunk.actions)
    return out


def test_episode_shapes_and_determinism(checkpoint):
    policy = load_policy(checkpoint)
    preset = policy.preset
    a = run_episode(policy)
    n_used = len(preset.used_action_channels)
    assert all(x.shape == (n_used, preset.frame_chunk_size, preset.action_per_frame) for x in a)
    assert all(x.dtype == np.float32 and np.isfinite(x).all() for x in a)
    assert policy.frame_offset == 3 * preset.frame_chunk_size
    b = run_episode(load_policy(checkpoint))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = run_episode(policy, seed=1)
    assert not np.allclose(a[0], c[0])


def test_sessions_share_weights_but_not_state(checkpoint):
    from vaops.models.checkpoint import load_weights

    weights = load_weights(checkpoint)
    p1, p2 = weights.new_policy(), weights.new_policy()
    assert p1.engine.model is p2.engine.model
    p1.reset("a", seed=0)
    p1.act(images(p1.preset, 0))
    p2.reset("a", seed=0)
    assert p2.frame_offset == 0 and p1.frame_offset == 0
    assert p1.engine.cache is not p2.engine.cache


def test_action_normalisation_round_trip():
    import torch

    preset = get_preset("robotwin")
    q01, q99 = torch.tensor(preset.norm_q01), torch.tensor(preset.norm_q99)
    x = torch.rand(30, 2, 16) * (q99 - q01).view(-1, 1, 1) + q01.view(-1, 1, 1)
    n = normalize_actions(x, q01, q99)
    used = list(preset.used_action_channels)
    assert n[used].min() >= -1.0001 and n[used].max() <= 1.0001
    torch.testing.assert_close(denormalize_actions(n, q01, q99), x, atol=1e-5, rtol=0)


def test_bad_inputs_are_named(checkpoint):
    policy = load_policy(checkpoint)
    preset = policy.preset
    with pytest.raises(RuntimeError, match="reset"):
        policy.act(images(preset, 0))
    policy.reset("x", seed=0)
    with pytest.raises(ValueError, match="needs the camera images"):
        policy.act(None)
    with pytest.raises(KeyError, match="observation.images.top"):
        policy.act({"observation.images.other": np.zeros((64, 96, 3), np.uint8)})
    chunk = policy.act(images(preset, 0))
    kf = [images(preset, 1)] * preset.frames_per_latent
    with pytest.raises(ValueError, match=r"executed actions must be \[14, F, 16\]"):
        policy.observe(kf, chunk.actions[:3])
    bad = chunk.actions.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        policy.observe(kf, bad)
    with pytest.raises(ValueError, match=r"12 keyframes for 2 executed latent frames; expected 4"):
        policy.observe(kf * 3, chunk.actions)
    policy.observe(kf, chunk.actions)
    assert policy.frame_offset == preset.frame_chunk_size


def test_policy_json_errors(checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    raw = json.loads((broken / "policy.json").read_text())
    raw["used_action_channels"] = [0, 31]
    (broken / "policy.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"policy.json: used_action_channels out of range 0..29: \[31\]"):
        load_policy(broken)
    del raw["cameras"]
    (broken / "policy.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="field 'cameras' is missing"):
        load_policy(broken)
    (broken / "policy.json").unlink()
    with pytest.raises(FileNotFoundError, match="policy.json is missing"):
        load_policy(broken)


def test_imagined_video(checkpoint):
    policy = load_policy(checkpoint)
    policy.reset("x", seed=0)
    chunk = policy.act(images(policy.preset, 0))
    video = policy.imagine(chunk.latents)
    cam = policy.preset.cameras[0]
    assert video.dtype == np.uint8
    assert video.shape == (1 + 4 * (policy.preset.frame_chunk_size - 1), cam.height, cam.width, 3)


def test_random_weights_match_preset():
    w = build_random_weights(get_preset("tiny"))
    assert w.text_encoder.dim == w.preset.transformer.text_dim


def keyframes(preset, chunk, seed):
    """The keyframes the robot takes while executing chunk `chunk` (the first skips the initial image)."""
    latent_frames = preset.frame_chunk_size - (1 if chunk == 0 else 0)
    return [images(preset, seed + i) for i in range(latent_frames * preset.frames_per_latent)]


def test_act_ahead_is_grounded_by_the_executing_chunks_observation(checkpoint):
    """Asynchronous execution: chunk 1 is computed while chunk 0 runs; observing chunk 0 (the episode's
    first: the initial image is its first latent frame) grounds it, so chunk 2 is what the synchronous
    loop gives after observing chunk 0 and then chunk 1 as it was imagined."""
    import torch

    fast = load_policy(checkpoint)
    preset = fast.preset
    fc = preset.frame_chunk_size
    fast.reset("transfer the cube", seed=5)
    c0 = fast.act(images(preset, 100))
    c1 = fast.act_ahead()
    imagined1 = fast.engine.ahead
    assert (c0.frame_offset, c1.frame_offset) == (0, fc)
    assert fast.frame_offset == fc and fast.observation_offset == 0
    with pytest.raises(RuntimeError, match="observe the executing chunk"):
        fast.act()
    with pytest.raises(ValueError, match=r"8 keyframes for 2 executed latent frames; expected 4"):
        fast.observe(keyframes(preset, 1, 300), c0.actions)
    with pytest.raises(ValueError, match="must cover the executing chunk's 2 latent frames, got 1"):
        fast.observe(keyframes(preset, 0, 300), c0.actions[:, :1])
    fast.observe(keyframes(preset, 0, 300), c0.actions)  # the refused calls left the stream intact
    assert fast.frame_offset == fast.observation_offset == fc and fast.engine.ahead is None
    c2 = fast.act_ahead()
    assert c2.frame_offset == 2 * fc and fast.observation_offset == fc
    fast.observe(keyframes(preset, 1, 400), c1.actions)  # a later chunk: 8 keyframes
    assert fast.frame_offset == 2 * fc

    ref = load_policy(checkpoint)
    ref.reset("transfer the cube", seed=5)
    np.testing.assert_array_equal(ref.act(images(preset, 100)).actions, c0.actions)
    ref.observe(keyframes(preset, 0, 300), c0.actions)
    ref.act()  # draws chunk 1's noise, as act_ahead did; its chunk is replaced by the imagined one
    ref.engine.observe(imagined1.video, imagined1.actions)
    r2 = ref.act()
    assert r2.frame_offset == c2.frame_offset
    np.testing.assert_allclose(c2.actions, r2.actions, atol=1e-5, rtol=0)
    torch.testing.assert_close(c2.latents, r2.latents, atol=1e-5, rtol=0)
    # The grounding really used the observation: other keyframes of chunk 0, another chunk 2.
    other = load_policy(checkpoint)
    other.reset("transfer the cube", seed=5)
    other.act(images(preset, 100))
    other.act_ahead()
    other.observe(keyframes(preset, 0, 500), c0.actions)
    assert np.abs(other.act_ahead().actions - c2.actions).max() > 5e-4


def test_warm_up_runs_the_filling_and_full_cache_shapes_and_leaves_no_trace(checkpoint):
    from vaops.models.checkpoint import load_weights

    weights = load_weights(checkpoint)
    warmed = weights.new_policy()
    seen = []
    forward = warmed.engine._forward
    warmed.engine._forward = lambda kind, x, *a, **k: seen.append((kind, warmed.engine.cache.full)) or forward(
        kind, x, *a, **k)
    assert warmed.warm_up() == 4
    # both phases of the cache, for the video and the action passes (the keys of captured graphs)
    assert {("video", False), ("action", False), ("video", True), ("action", True)} <= set(seen)
    assert warmed.frame_offset == 0 and len(warmed.engine.cache) == 0
    warmed.engine._forward = forward
    for x, y in zip(run_episode(warmed, chunks=2), run_episode(weights.new_policy(), chunks=2)):
        np.testing.assert_array_equal(x, y)


def test_operating_points_are_chosen_per_episode_and_kept_in_policy_json(checkpoint, tmp_path):
    import dataclasses
    import shutil

    from vaops.models.checkpoint import POLICY_FILE, load_weights, read_preset

    weights = load_weights(checkpoint)
    policy = weights.new_policy()
    released = run_episode(policy, chunks=1)
    names = set(policy.preset.operating_point_settings())
    assert {"released", "paper", "fast"} <= names
    policy.reset("x", seed=0, operating_point="paper")
    assert policy.engine.video_schedule.final == 0.4 and policy.operating_point == "paper"
    policy.reset("x", seed=0, operating_point="fast")
    assert len(policy.engine.action_schedule.sigmas) == 4
    # a pooled policy goes back to the checkpoint's own settings at the next plain reset
    for x, y in zip(run_episode(policy, chunks=1), released):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="operating_point 'turbo': this model offers fast, paper, released"):
        policy.reset("x", seed=0, operating_point="turbo")

    # policy.json lists them; a checkpoint may define its own, and one that needs another cache is refused
    raw = json.loads((checkpoint / POLICY_FILE).read_text())
    assert set(raw["operating_points"]) == names
    own = tmp_path / "own"
    shutil.copytree(checkpoint, own)
    steps2 = dict(raw["sampling"], video_steps=2)
    (own / POLICY_FILE).write_text(json.dumps({**raw, "operating_points": {"two": steps2}}))
    assert read_preset(own).operating_point("two") == dataclasses.replace(read_preset(own).sampling, video_steps=2)
    wide = dict(raw["sampling"], attn_window=raw["sampling"]["attn_window"] + 2)
    (own / POLICY_FILE).write_text(json.dumps({**raw, "operating_points": {"wide": wide}}))
    with pytest.raises(ValueError, match="policy.json.*operating point 'wide': attn_window"):
        read_preset(own)


def test_policy_json_keeps_the_presets_control_rate(tmp_path):
    """A checkpoint's action rate survives its policy.json: a tiny-sized preset made for any dataset
    rate (as the released ones are) must not come back as tiny's 10 actions/s, and a file written
    before the field existed keeps its base preset's rate."""
    from vaops.models.checkpoint import POLICY_FILE, read_preset, write_random_checkpoint
    from vaops.models.config import get_preset

    tiny = get_preset("tiny")
    assert tiny.control_fps == 10
    folder = write_random_checkpoint(tmp_path / "any-rate", tiny.replace(control_fps=None))
    assert json.loads((folder / POLICY_FILE).read_text())["control_fps"] is None
    assert read_preset(folder).control_fps is None
    raw = json.loads((folder / POLICY_FILE).read_text())
    del raw["control_fps"]
    (folder / POLICY_FILE).write_text(json.dumps(raw))
    assert read_preset(folder).control_fps == 10


def test_policies_running_at_once_give_each_robot_the_chunks_it_gets_alone(checkpoint):
    """`vaops serve --compute-threads`: several sessions' operations in flight at once (on a GPU each on its
    own CUDA stream) share the weights, the compiled regions and the VAE; each robot's chunks must be what it
    gets alone, step for step."""
    import threading

    from vaops.models.checkpoint import load_weights
    from vaops.models.policy import allow_concurrent_policies

    weights = load_weights(checkpoint)
    allow_concurrent_policies()
    alone = [run_episode(weights.new_policy(), seed=s) for s in range(3)]
    policies = [weights.new_policy() for _ in range(3)]
    assert all(p.stream is None for p in policies)  # a CPU has no streams: the threads alone overlap
    together: list = [None] * 3
    start = threading.Barrier(3)

    def robot(r):
        start.wait()
        together[r] = run_episode(policies[r], seed=r)

    threads = [threading.Thread(target=robot, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not np.allclose(alone[0][0], alone[1][0])  # the robots differ, so a mix-up would show
    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_stream_claims_give_live_policies_streams_of_their_own_while_the_pool_has_them():
    """torch hands out its 32 streams a device round-robin, also to other users (here: every third draw), so a
    policy's stream is chosen among the free ones; past 32 live claims two share one, and its lock."""
    import gc
    from types import SimpleNamespace

    from vaops.models.cuda_graphs import STREAMS_PER_POOL, StreamClaim

    drawn = [0]

    def pool_stream():  # torch.cuda.Stream() on a device of its own: the pool's next stream
        drawn[0] += 1
        return SimpleNamespace(device_index=99, stream_id=drawn[0] % STREAMS_PER_POOL)

    claims = []
    for _ in range(STREAMS_PER_POOL):
        claims.append(StreamClaim(new_stream=pool_stream))
        pool_stream()  # someone else's stream in between
    assert len({c.key for c in claims}) == STREAMS_PER_POOL
    extra = StreamClaim(new_stream=pool_stream)
    sharer = next(c for c in claims if c.key == extra.key)
    assert extra.lock is sharer.lock and len({id(c.lock) for c in claims}) == STREAMS_PER_POOL
    freed = claims.pop(5).key
    gc.collect()
    assert StreamClaim(new_stream=pool_stream).key == freed
