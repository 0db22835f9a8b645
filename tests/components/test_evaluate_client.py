"""The evaluation client against misbehaving policy servers, and the pieces of the evaluation
that need no server: action checks, RoboTwin's end-effector conversion and observations,
shards, the episode log, merging, and the real | imagined video alignment."""

import json
import socket
import sys
from http import HTTPStatus
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from websockets.sync.server import serve

from vaops.components.evaluate import robotwin
from vaops.components.evaluate.client import (PolicyClient, PolicyConnectionError, PolicyDisconnected,
                                              PolicyProtocolError, check_actions)
from vaops.components.evaluate.config import ClientConfig, Shard, TrackingConfig, get_eval_preset
from vaops.components.evaluate.episode import ChunkFrames
from vaops.components.evaluate.results import EpisodeLog, EpisodeRecord, merge, shard_units, work_units
from vaops.components.evaluate.run import EvaluationAborted, run
from vaops.components.evaluate.video import side_by_side
from vaops.models.msgpack_numpy import packb, unpackb

FIXTURES = Path(__file__).parents[1] / "fixtures" / "robotwin"


class ScriptedServer:
    """A tiny websocket policy server; episode i (counted by resets) follows behaviours[i]:
    good | malformed (action of the wrong shape) | nan | text (a server error) |
    dies (drops the connection when the executed actions come back) | hangs (never answers) |
    quits (the whole server stops at the first chunk request: later connections are refused)."""

    def __init__(self, behaviours, token=None):
        self.behaviours = list(behaviours)
        self.episode = -1
        self.token = token
        self.server = serve(self.handle, "127.0.0.1", 0, compression=None, max_size=None,
                            process_request=self.check_token)
        self.url = f"ws://127.0.0.1:{self.server.socket.getsockname()[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def check_token(self, connection, request):
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return connection.respond(HTTPStatus.UNAUTHORIZED, "token required\n")
        return None

    def handle(self, ws):
        ws.send(packb({"server": "scripted"}))
        for raw in ws:
            msg = unpackb(raw)
            if msg.get("reset"):
                self.episode += 1
                ws.send(packb({}))
                continue
            behaviour = self.behaviours[self.episode]
            if msg.get("compute_kv_cache"):
                if behaviour == "dies":
                    ws.socket.shutdown(socket.SHUT_RDWR)
                    return
                ws.send(packb({}))
            elif behaviour == "malformed":
                ws.send(packb({"action": np.zeros((14, 2), np.float32)}))
            elif behaviour == "nan":
                ws.send(packb({"action": np.full((14, 2, 16), np.nan, np.float32)}))
            elif behaviour == "text":
                ws.send("RuntimeError: CUDA out of memory")
            elif behaviour == "hangs":
                time.sleep(1)
            elif behaviour == "quits":
                # shutdown() waits for the handlers, this one included: it runs beside it, and the
                # handler returns once the listening socket is closed.
                threading.Thread(target=self.server.shutdown, daemon=True).start()
                self.server.socket_closed.wait()
                return
            else:
                ws.send(packb({"action": np.zeros((14, 2, 16), np.float32)}))

    def close(self):
        self.server.shutdown()


@pytest.fixture
def scripted():
    servers = []

    def make(*behaviours, token=None):
        servers.append(ScriptedServer(behaviours, token))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_misbehaving_policy_fails_episodes_with_reasons_not_the_evaluation(scripted, tmp_path):
    server = scripted("malformed", "dies", "nan", "good")
    config = get_eval_preset("smoke", tmp_path, client=ClientConfig(url=server.url, request_timeout_s=10),
                             tasks=("AlohaTransferCube-v0",), episodes=4, videos=False,
                             tracking=TrackingConfig(enabled=False))
    result = run(config)
    malformed, dies, nan, good = result.records
    assert malformed.status == "error" and malformed.steps == 0
    assert "reply field 'action' must have shape [14, FC, N], got [14, 2]" in malformed.error
    # it executed the first chunk (16 actions), then the server dropped the connection
    assert dies.status == "error" and dies.steps == 16 and dies.chunks == 1
    assert dies.error.startswith("PolicyDisconnected: observation update: connection to ws://127.0.0.1")
    assert nan.status == "error" and "contains NaN or inf" in nan.error
    # the client reconnected for the next episode, which ran to its step limit
    assert (good.status, good.steps, good.chunks, good.error) == ("failure", 48, 2, None)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["errors"] == 3 and metrics["episodes"] == 4
    report = (tmp_path / "report.md").read_text()
    assert "## Errors" in report and "got [14, 2]" in report


def test_server_error_text_and_silence_are_named(scripted):
    server = scripted("text", "hangs")
    obs = {"observation.images.top": np.zeros((64, 96, 3), np.uint8)}
    with PolicyClient(ClientConfig(url=server.url, request_timeout_s=0.5)) as client:
        client.reset("p")
        with pytest.raises(Exception, match="server error: RuntimeError: CUDA out of memory"):
            client.act(obs, "p", 14, 4)
        client.reset("p")
        start = time.monotonic()
        with pytest.raises(PolicyDisconnected, match="no reply from .* within 0.5 s"):
            client.act(obs, "p", 14, 4)
        assert time.monotonic() - start < 2
        assert not client.connected


def test_token(scripted):
    server = scripted("good", token="secret-token-1")
    with pytest.raises(PolicyConnectionError, match=r"refused the connection: HTTP 401 \(missing or wrong token\?\)"):
        PolicyClient(ClientConfig(url=server.url)).reset("p")
    with PolicyClient(ClientConfig(url=server.url, token="secret-token-1")) as client:
        client.reset("p")
        assert client.metadata == {"server": "scripted"}


def test_dead_server_stops_the_evaluation_with_saved_episodes(scripted, tmp_path):
    server = scripted("quits")
    config = get_eval_preset("smoke", tmp_path, episodes=6, tasks=("AlohaInsertion-v0",), videos=False,
                             client=ClientConfig(url=server.url, connect_attempts=2, retry_delay_s=0.01),
                             tracking=TrackingConfig(enabled=False))
    with pytest.raises(EvaluationAborted, match="3 episodes in a row could not reach the policy server"):
        run(config)
    records = EpisodeLog(config.shard_dir() / "episodes.jsonl").read()
    assert [r.episode for r in records] == [0, 1, 2, 3]
    assert "PolicyDisconnected: chunk request: connection to" in records[0].error
    assert all("unreachable after 2 attempt(s)" in r.error for r in records[1:])
    manifest = json.loads((config.shard_dir() / "shard.json").read_text())
    assert manifest["complete"] is False
    with pytest.raises(ValueError, match="did not finish"):
        merge(tmp_path)


def test_no_server_is_one_error_line_before_any_episode(tmp_path, capsys):
    from vaops.pipelines.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{s.getsockname()[1]}"  # nothing listens here once the socket is closed
    out = tmp_path / "eval"
    code = main(["eval", "--preset", "smoke", "--policy-url", url, "--output", str(out), "--no-mlflow",
                 "--no-videos", "--connect-attempts", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"vaops eval: error: policy server at {url} unreachable")
    assert not out.exists()  # no episode ran, nothing was written


def test_eval_flags_are_the_configs_fields_with_the_documented_names(tmp_path):
    import argparse

    from vaops.components.evaluate import cli
    from vaops.components.evaluate.config import PRESETS, EvalConfig
    from vaops.components.stage_cli import config_from_args

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--preset", "robotwin", "--robotwin-root", "/rt", "--policy-url", "ws://gpu0:8080",
                              "--output", str(tmp_path), "--shard", "1/8", "--tasks", "click_bell", "--settings",
                              "clean", "--request-timeout", "5", "--no-mlflow", "--no-videos", "--no-imagine",
                              "--max-steps", "none", "--experiment", "e", "--model-run-id", "r"])
    config = config_from_args(EvalConfig, PRESETS, args)
    assert config == get_eval_preset("robotwin", tmp_path, robotwin_root="/rt", shard=Shard(1, 8), tasks=("click_bell",),
                                     settings=("clean",), client=ClientConfig(url="ws://gpu0:8080", request_timeout_s=5),
                                     videos=False, imagine=False, max_steps=None,
                                     tracking=TrackingConfig(enabled=False, experiment="e", model_run_id="r"))
    for flags, mode in ((["--async-execution"], True), (["--async-execution", "grounded"], "grounded"), ([], False)):
        assert config_from_args(EvalConfig, PRESETS, parser.parse_args(flags)).async_execution == mode
    assert config_from_args(EvalConfig, PRESETS, parser.parse_args(["--real-time"])).real_time is True
    assert "--token" not in parser._option_string_actions  # read from --token-env's variable, never a flag


def test_resume_runs_error_episodes_again_and_keeps_verdicts(scripted, tmp_path):
    from vaops.components.evaluate.aloha import episode_seed

    task = "AlohaTransferCube-v0"
    first = scripted("text", "good")  # episode 0: a server error; episode 1: the policy fails
    config = get_eval_preset("smoke", tmp_path, tasks=(task,), episodes=3, videos=False,
                             client=ClientConfig(url=first.url, request_timeout_s=10),
                             tracking=TrackingConfig(enabled=False))
    # episode 2 succeeded in an earlier run: a verdict, kept as it is
    success = EpisodeRecord(suite="aloha", setting="sim", task=task, episode=2, seed=episode_seed(0, 2),
                            prompt="p", status="success", success=True, progress=1.0, steps=20, chunks=1)
    EpisodeLog(config.shard_dir() / "episodes.jsonl").append(success)
    error, failure, kept = run(config).records
    assert first.episode == 1  # two resets: episode 2 did not run
    assert error.status == "error" and "CUDA out of memory" in error.error
    assert failure.status == "failure" and kept == success

    second = scripted("good")
    result = run(config.replace(client=ClientConfig(url=second.url, request_timeout_s=10)))
    assert second.episode == 0  # one reset: only the episode that ended in error ran again
    rerun, failure_again, kept_again = result.records
    assert (rerun.episode, rerun.status, rerun.error, rerun.steps) == (0, "failure", None, 48)
    assert (failure_again, kept_again) == (failure, success)
    assert result.metrics["errors"] == 0 and result.metrics["episodes"] == 3
    merged = (tmp_path / "episodes.jsonl").read_text().splitlines()
    assert len(merged) == 3  # the superseded error line stays in the shard's log only
    assert len((config.shard_dir() / "episodes.jsonl").read_text().splitlines()) == 4


def test_check_actions():
    good = np.zeros((16, 2, 16), np.float64)
    assert check_actions(good, 16, 4).dtype == np.float32
    for bad, message in [(good.tolist(), "must be an array"), (good.astype(np.int32), "floating point"),
                         (good[:14], r"shape \[16, FC, N\], got \[14, 2, 16\]"),
                         (np.zeros((16, 2, 6)), "not a multiple of the 4"),
                         (np.full((16, 2, 16), np.inf), "NaN or inf")]:
        with pytest.raises(PolicyProtocolError, match=message):
            check_actions(bad, 16, 4)


def fixture_observation(i=0):
    frames = np.load(FIXTURES / "observations.npz")
    obs = {"observation": {}, "joint_action": {}, "endpose": {}}
    for key in frames.files:
        group, *rest = key.split("/")
        node = obs[group]
        for part in rest[:-1]:
            node = node.setdefault(part, {})
        node[rest[-1]] = frames[key][i]
    for side in ("left", "right"):
        obs["endpose"][f"{side}_endpose"] = obs["endpose"][f"{side}_endpose"].tolist()
    ja = obs["joint_action"]
    ja["vector"] = np.concatenate([ja["left_arm"], [ja["left_gripper"]], ja["right_arm"], [ja["right_gripper"]]])
    return obs


def test_robotwin_observation_and_end_effector_conversion():
    raw = fixture_observation(2)
    wire = robotwin.wire_observation(raw, "adjust the bottle")
    assert [k for k in wire] == list(robotwin.CAMERAS) + ["observation.state", "task"]
    assert all(wire[k].shape == (240, 320, 3) and wire[k].dtype == np.uint8 for k in robotwin.CAMERAS)
    assert wire["observation.state"].shape == (14,)
    init = robotwin.initial_pose(raw)
    assert init.shape == (16,) and init[7] == raw["endpose"]["left_gripper"]

    # identity deltas give back the initial poses (with the action's grippers)
    identity = np.array([0, 0, 0, 0, 0, 0, 1, 0.3] * 2, np.float64)
    out = robotwin.ee_command(identity, init)
    np.testing.assert_allclose(out[[0, 1, 2, 8, 9, 10]], init[[0, 1, 2, 8, 9, 10]])
    np.testing.assert_allclose(np.abs(out[3:7]), np.abs(init[3:7]), atol=1e-12)
    assert out[7] == out[15] == 0.3

    rng = np.random.default_rng(0)
    delta = np.concatenate([rng.normal(size=3) * 0.05, rng.normal(size=4), [0.8],
                            rng.normal(size=3) * 0.05, rng.normal(size=4), [0.1]])
    out = robotwin.ee_command(delta, init)
    for arm in (0, 8):
        expected_rot = Rotation.from_quat(init[arm + 3: arm + 7]) * Rotation.from_quat(delta[arm + 3: arm + 7])
        np.testing.assert_allclose(out[arm: arm + 3], init[arm: arm + 3] + delta[arm: arm + 3])
        assert np.linalg.norm(out[arm + 3: arm + 7]) == pytest.approx(1.0)
        assert (Rotation.from_quat(out[arm + 3: arm + 7]) * expected_rot.inv()).magnitude() < 1e-9
    with pytest.raises(ValueError, match="must have 16 values"):
        robotwin.ee_command(delta[:14], init)
    del raw["endpose"]
    with pytest.raises(KeyError, match="endpose"):
        robotwin.initial_pose(raw)


def test_robotwin_protocol_constants():
    assert len(robotwin.ROBOTWIN_TASKS) == 50 == len(set(robotwin.ROBOTWIN_TASKS))
    config = get_eval_preset("robotwin", "/tmp/x", robotwin_root="/nowhere")
    assert (config.episodes, config.settings, config.max_steps) == (100, ("clean", "randomized"), None)
    assert len(work_units(config)) == 100  # one unit per (setting, task): a task's seeds are walked in order
    assert robotwin.first_seed(0) == 10000
    with pytest.raises(FileNotFoundError, match="not a RoboTwin 2.0 checkout"):
        robotwin.RoboTwinCheckout(FIXTURES)
    with robotwin.RoboTwinCheckout(FIXTURES / "checkout") as checkout:
        with pytest.raises(ValueError, match="has no task 'stack_bowls_two'"):
            checkout.make_task("stack_bowls_two")
        args = checkout.task_args("adjust_bottle", "randomized")
        assert args["domain_randomization"]["cluttered_table"] is True
        assert (args["head_camera_h"], args["head_camera_w"]) == (240, 320) and args["dual_arm_embodied"]
        with pytest.raises(ValueError, match="setting must be one of"):
            checkout.task_args("adjust_bottle", "hard")
        assert "envs.utils.create_actor" in sys.modules
    # the checkout's modules are forgotten again, so another checkout imports its own
    assert not [m for m in sys.modules if m.split(".")[0] in ("envs", "description")]


def test_shards_partition_the_work():
    config = get_eval_preset("aloha", "/tmp/x", episodes=5)
    units = work_units(config)
    shards = [shard_units(units, Shard(i, 3)) for i in range(3)]
    assert sorted((u for s in shards for u in s), key=units.index) == units
    assert [len(s) for s in shards] == [4, 3, 3]
    assert Shard.parse(" 2/3 ") == Shard(2, 3)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            Shard.parse(bad)


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="unknown ALOHA task"):
        get_eval_preset("smoke", "/tmp/x", tasks=("fold_shirt",))
    with pytest.raises(ValueError, match="needs robotwin_root"):
        get_eval_preset("robotwin", "/tmp/x", settings=("clean",))
    with pytest.raises(ValueError, match="must start with ws://"):
        ClientConfig(url="http://localhost:8080")
    with pytest.raises(ValueError, match="unknown evaluation preset"):
        get_eval_preset("libero_long", "/tmp/x")


def record(episode, seed=1, **kw):
    return EpisodeRecord(suite="aloha", setting="sim", task="t", episode=episode, seed=seed, prompt="p",
                         status="failure", success=False, progress=0.0, steps=3, chunks=1, **kw)


def test_episode_log_survives_a_cut_line_and_merge_checks_identity(tmp_path):
    log = EpisodeLog(tmp_path / "episodes.jsonl")
    log.append(record(0))
    with open(log.path, "a") as f:
        f.write('{"suite": "aloha", "sett')  # killed mid-write
    assert [r.episode for r in log.read()] == [0]
    log.append(record(1))
    assert [r.episode for r in log.read()] == [0, 1]

    from vaops.components.evaluate.results import check_resumable, write_manifest

    a = get_eval_preset("smoke", tmp_path / "m", shard=Shard(0, 2), tracking=TrackingConfig(enabled=False))
    write_manifest(a, complete=True, episodes=0)
    write_manifest(a.replace(shard=Shard(1, 2), episodes=7), complete=True, episodes=0)
    with pytest.raises(ValueError, match="evaluates something else"):
        merge(tmp_path / "m")
    with pytest.raises(ValueError, match=r"holds another evaluation \(different episodes\)"):
        check_resumable(a.replace(episodes=3))
    check_resumable(a)  # the same evaluation resumes
    with pytest.raises(FileNotFoundError, match="no shards to merge"):
        merge(tmp_path / "empty")


def test_imagined_video_is_aligned_per_chunk():
    real = [np.full((8, 12, 3), 10 * i, np.uint8) for i in range(8)]
    imagined = np.stack([np.full((4, 6, 3), 50 * (k + 1), np.uint8) for k in range(5)])
    # a chunk of 8 expected frames with 5 imagined ones, then a chunk cut short (3 of 8 frames)
    frames = side_by_side([ChunkFrames(real, 8, imagined), ChunkFrames(real[:3], 8, imagined[::-1].copy())])
    assert len(frames) == 11 and len({f.shape for f in frames}) == 1
    w = frames[0].shape[1]
    shown = [int(f[-1, w - 2, 0]) for f in frames]  # bottom-right pixel: the imagined panel
    assert shown == [50, 50, 100, 100, 150, 200, 200, 250] + [250, 250, 200]
    blank = side_by_side([ChunkFrames(real[:2], 2, None)])
    assert blank[0][-1, w - 2].tolist() == [0, 0, 0]
