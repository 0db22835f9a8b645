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


def evaluate(url: str, out: Path, async_execution: bool, tracking: TrackingConfig, tasks: tuple[str, ...] | None = None):
    config = get_eval_preset("smoke", out, client=ClientConfig(url=url, request_timeout_s=60), max_steps=MAX_STEPS,
                             fps=FPS, videos=False, real_time=True, async_execution=async_execution,
                             tracking=tracking, tasks=tasks)
    return run(config)


def ahead_computations(port: int) -> float:
    """How many chunks the server computed ahead (its Prometheus count of `act_ahead` operations)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vaops_episode_op_seconds_count{") and 'op="act_ahead"' in line)


def test_async_execution_computes_the_next_chunk_while_the_robot_moves(tmp_path):
    """Behaviour, not speed: the async loop is handed chunks the server computed ahead, and the
    idle it records spans its round trips. How much idle that saves is a timing claim, measured
    on the GPU by bench/async_idle.py (results/async_idle_h200.json), not asserted here."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with LocalPolicyServer(slow_tiny_checkpoint(tmp_path / "ck"), tmp_path / "server.log", torch_threads=1) as server:
        # the synchronous baseline on one episode; the asynchronous loop on both tasks' (a reset between)
        sync = evaluate(server.url, tmp_path / "sync", False, TrackingConfig(enabled=False), ("AlohaInsertion-v0",))
        after_sync = ahead_computations(server.port)
        fast = evaluate(server.url, tmp_path / "async", True, TrackingConfig(tracking_uri=uri))
        after_async = ahead_computations(server.port)

    chunks = len(CHUNK_ACTIONS)
    # Sync computes every chunk on request. Async computes chunks 2..3 of each of the 2 episodes
    # while the one before runs; the ahead started after chunk 3 is dropped at the next reset,
    # counted only if it had begun.
    assert after_sync == 0
    assert 2 * (chunks - 1) <= after_async - after_sync <= 2 * chunks
    period = 1 / FPS
    for result, episodes in ((sync, 1), (fast, 2)):
        assert [(r.status, r.steps, r.chunks) for r in result.records] == [("failure", MAX_STEPS, chunks)] * episodes
        for r in result.records:
            assert r.error is None and len(r.idle_s) == chunks - 1 and len(r.execution_s) == chunks
            # real time: a chunk takes at least its actions' control periods, stepping included
            for actions, seconds in zip(CHUNK_ACTIONS, r.execution_s):
                assert seconds >= actions * period * 0.99
        for idle, observe, act in zip((x for r in result.records for x in r.idle_s),
                                      (x for r in result.records for x in r.observe_latency_s),
                                      (x for r in result.records for x in r.chunk_latency_s[1:])):
            assert idle >= observe + act  # idle spans the observe and the next act round trips

    idle_sync, idle_async = sync.metrics["latency"]["idle"], fast.metrics["latency"]["idle"]
    assert (idle_sync["count"], idle_async["count"]) == (chunks - 1, 2 * (chunks - 1)) == (2, 4)
    loop_sync, loop_async = sync.metrics["control_loop"], fast.metrics["control_loop"]
    assert (loop_sync["async_execution"], loop_async["async_execution"]) == (False, True)
    assert 0 < loop_async["idle_fraction"] < 1 and 0 < loop_sync["idle_fraction"] < 1
    execution = [x for r in sync.records for x in r.execution_s]
    assert loop_sync["idle_fraction"] == sum(
        x for r in sync.records for x in r.idle_s) / (sum(x for r in sync.records for x in r.idle_s) + sum(execution))

    saved = json.loads((tmp_path / "async" / "metrics.json").read_text())
    assert saved["control_loop"] == loop_async and saved["latency"]["idle"] == idle_async
    md = (tmp_path / "async" / "report.md").read_text()
    assert "## Control loop" in md and "asynchronous execution, real time" in md
    assert f"| idle between chunks | 4 | {idle_async['p50_s']:.3f} | {idle_async['p95_s']:.3f} |" in md
    assert "synchronous execution, real time" in (tmp_path / "sync" / "report.md").read_text()
    logged = mlflow.MlflowClient(uri).get_run(fast.mlflow_run_id).data
    assert logged.metrics["latency.idle.p50_s"] == idle_async["p50_s"]
    assert logged.metrics["control_loop.idle_fraction"] == loop_async["idle_fraction"]
    assert logged.params["async_execution"] == "True" and logged.params["real_time"] == "True"


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
