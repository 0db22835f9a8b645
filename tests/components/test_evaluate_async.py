"""The control loop's idle time in the ALOHA sim evaluation, paced in real time, with and without
asynchronous execution, through one live `vaops serve` of a tiny random checkpoint.

Sizes: 80 + 80 denoising steps make a chunk take about 0.25 s on one idle CPU thread, several
times the observe, and well under a chunk's execution (32 actions at 10 fps = 3.2 s)."""

import dataclasses
import json
import urllib.request
from pathlib import Path

import pytest
from test_evaluate_client import ScriptedServer

from vaops.components.evaluate.client import PolicyClient, PolicyProtocolError
from vaops.components.evaluate.config import ClientConfig, TrackingConfig, get_eval_preset
from vaops.components.evaluate.local_server import LocalPolicyServer
from vaops.components.evaluate.run import run
from vaops.models.checkpoint import build_random_weights, save_checkpoint
from vaops.models.config import get_preset

# Divides the sim's 50 Hz. At 25 the 32 actions of a chunk (1.28 s) left too little room for the
# chunk computed ahead (~0.6 s alone) when the suite's other worker loaded the second core; at 10,
# the demos' own rate, a chunk runs 3.2 s.
FPS = 10
# The first chunk runs one latent frame, the others two; the third is the first computed ahead while
# a chunk computed ahead runs.
CHUNK_ACTIONS = (16, 32, 32)
MAX_STEPS = sum(CHUNK_ACTIONS)


def slow_tiny_checkpoint(folder: Path) -> Path:
    preset = get_preset("tiny")
    preset = preset.replace(sampling=dataclasses.replace(preset.sampling, video_steps=80, action_steps=80))
    w = build_random_weights(preset, seed=0)
    return save_checkpoint(folder, preset, w.transformer, w.vae, w.text_encoder)


def evaluate(url: str, out: Path, async_execution: bool | str, tracking: TrackingConfig,
             tasks: tuple[str, ...] | None = None, real_time: bool = True):
    config = get_eval_preset("smoke", out, client=ClientConfig(url=url, request_timeout_s=60), max_steps=MAX_STEPS,
                             fps=FPS, videos=False, real_time=real_time, async_execution=async_execution,
                             tracking=tracking, tasks=tasks)
    return run(config)


def ahead_computations(port: int) -> float:
    """How many chunks the server computed ahead (its Prometheus count of `act_ahead` operations)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vaops_episode_op_seconds_count{") and 'op="act_ahead"' in line)


@pytest.fixture(scope="module")
def loops(tmp_path_factory):
    """One live server; the synchronous loop on one episode, then the asynchronous loop on both tasks'
    (a reset between), each with the server's count of chunks computed ahead after it; last one
    episode of grounded asynchronous execution, unpaced."""
    root = tmp_path_factory.mktemp("async")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with LocalPolicyServer(slow_tiny_checkpoint(root / "ck"), root / "server.log", torch_threads=1) as server:
        sync = evaluate(server.url, root / "sync", False, TrackingConfig(enabled=False), ("AlohaInsertion-v0",))
        after_sync = ahead_computations(server.port)
        fast = evaluate(server.url, root / "async", True, TrackingConfig(tracking_uri=uri))
        after_async = ahead_computations(server.port)
        grounded = evaluate(server.url, root / "grounded", "grounded", TrackingConfig(enabled=False),
                            ("AlohaInsertion-v0",), real_time=False)
        after_grounded = ahead_computations(server.port)
    return {"root": root, "uri": uri, "sync": sync, "async": fast, "grounded": grounded,
            "ahead": (after_sync, after_async, after_grounded)}


CHUNKS = len(CHUNK_ACTIONS)


def test_async_execution_computes_the_next_chunk_while_the_robot_moves(loops):
    """Behaviour, not speed: the async loop is handed chunks the server computed ahead, and the
    idle it records spans its round trips. How much idle that saves is a timing claim, measured
    on the GPU by bench/async_idle.py (results/async_idle_h200.json), not asserted here."""
    after_sync, after_async, _ = loops["ahead"]
    # Sync computes every chunk on request. Async computes chunks 2..3 of each of the 2 episodes
    # while the one before runs; the ahead started after chunk 3 is dropped at the next reset,
    # counted only if it had begun.
    assert after_sync == 0
    assert 2 * (CHUNKS - 1) <= after_async - after_sync <= 2 * CHUNKS
    assert (loops["sync"].metrics["control_loop"]["async_execution"],
            loops["async"].metrics["control_loop"]["async_execution"]) == (False, True)


@pytest.mark.parametrize("loop,episodes", [("sync", 1), ("async", 2)])
def test_both_loops_run_in_real_time_and_idle_spans_the_round_trips(loops, loop, episodes):
    result = loops[loop]
    assert [(r.status, r.steps, r.chunks) for r in result.records] == [("failure", MAX_STEPS, CHUNKS)] * episodes
    for r in result.records:
        assert r.error is None and len(r.idle_s) == CHUNKS - 1 and len(r.execution_s) == CHUNKS
        # real time: a chunk takes at least its actions' control periods, stepping included
        for actions, seconds in zip(CHUNK_ACTIONS, r.execution_s):
            assert seconds >= actions * (1 / FPS) * 0.99
    for idle, observe, act in zip((x for r in result.records for x in r.idle_s),
                                  (x for r in result.records for x in r.observe_latency_s),
                                  (x for r in result.records for x in r.chunk_latency_s[1:])):
        assert idle >= observe + act  # idle spans the observe and the next act round trips
    idle = result.metrics["latency"]["idle"]
    assert idle["count"] == episodes * (CHUNKS - 1)
    control = result.metrics["control_loop"]
    assert 0 < control["idle_fraction"] < 1
    idle_s = sum(x for r in result.records for x in r.idle_s)
    assert control["idle_fraction"] == idle_s / (idle_s + sum(x for r in result.records for x in r.execution_s))
    md = (loops["root"] / loop / "report.md").read_text()
    assert f"{'asynchronous' if loop == 'async' else 'synchronous'} execution, real time" in md
    assert ("asynchronous execution" in md) == (loop == "async")


def test_the_control_loop_is_saved_reported_and_logged(loops):
    import mlflow

    fast = loops["async"]
    idle, control = fast.metrics["latency"]["idle"], fast.metrics["control_loop"]
    saved = json.loads((loops["root"] / "async" / "metrics.json").read_text())
    assert saved["control_loop"] == control and saved["latency"]["idle"] == idle
    md = (loops["root"] / "async" / "report.md").read_text()
    assert "## Control loop" in md
    assert f"| idle between chunks | 4 | {idle['p50_s']:.3f} | {idle['p95_s']:.3f} |" in md
    logged = mlflow.MlflowClient(loops["uri"]).get_run(fast.mlflow_run_id).data
    assert logged.metrics["latency.idle.p50_s"] == idle["p50_s"]
    assert logged.metrics["control_loop.idle_fraction"] == control["idle_fraction"]
    assert logged.params["async_execution"] == "True" and logged.params["real_time"] == "True"


def test_an_episode_runs_in_grounded_asynchronous_execution(loops):
    """The paper's variant through the same server: the episode runs its chunks, each after the first
    computed ahead (from chunk 2 on after re-imagining the executing chunk: tests/serving/test_grounded_async.py
    and tests/models/test_engine_grounded.py check what is computed), and it is recorded as grounded."""
    _, after_async, after_grounded = loops["ahead"]
    result = loops["grounded"]
    assert [(r.status, r.steps, r.chunks, r.error) for r in result.records] == [("failure", MAX_STEPS, CHUNKS, None)]
    assert CHUNKS - 1 <= after_grounded - after_async <= CHUNKS
    control = result.metrics["control_loop"]
    assert (control["async_execution"], control["async_mode"], control["real_time"]) == (True, "grounded", False)
    assert loops["async"].metrics["control_loop"]["async_mode"] == "naive"
    assert "asynchronous (grounded) execution, as fast as the sim steps" in (loops["root"] / "grounded" / "report.md").read_text()


def test_async_execution_needs_a_server_that_offers_it(tmp_path):
    """A server without it (upstream's ignores unknown reset fields) would silently run synchronously."""
    server = ScriptedServer(["good"])
    try:
        config = get_eval_preset("smoke", tmp_path, client=ClientConfig(url=server.url), tasks=("AlohaInsertion-v0",),
                                 videos=False, async_execution=True, tracking=TrackingConfig(enabled=False))
        [record] = run(config).records
    finally:
        server.close()
    assert record.status == "error" and record.steps == 0
    assert "does not offer asynchronous execution (no 'async_execution' in its metadata)" in record.error
    with pytest.raises(ValueError, match="real_time pacing needs the environment's control rate: suite 'aloha' only"):
        get_eval_preset("robotwin", tmp_path, robotwin_root=tmp_path, real_time=True)


def test_grounded_needs_a_server_that_lists_it(tmp_path):
    """A vaops server from before grounded async offers async_execution but no async_modes: asking it for
    'grounded' is refused by the client rather than run as naive."""
    server = ScriptedServer(["good"])
    try:
        with PolicyClient(ClientConfig(url=server.url)) as client:
            client.connect()
            client.metadata = {"async_execution": True}
            with pytest.raises(PolicyProtocolError, match="offers no 'grounded' asynchronous execution"):
                client.reset("transfer the cube", async_execution="grounded")
    finally:
        server.close()
    with pytest.raises(ValueError, match="async_execution must be true, false or one of"):
        get_eval_preset("smoke", tmp_path, async_execution="eager")
