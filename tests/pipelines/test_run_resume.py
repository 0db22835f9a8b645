"""`vaops run` resumes an interrupted training: the command is killed (its whole process group,
SIGKILL) once the train step saved its first checkpoint, and the same command again takes the data
steps from the cache and continues the training from that checkpoint onto the curve of an
uninterrupted run (the same losses and weights). A finished training is reused, not trained again;
another train config, dataset or base checkpoint starts a run folder of its own.

One interrupted run at the smallest sizes (1 short episode, 24 tiny steps): the rerun and the run
with another config are stopped once their training is done or has started, as the steps after
training are tested by test_pipeline.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from kfp import dsl
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from vaops.components.train.checkpointing import RUN_KEY_FILE, TrainerState, list_checkpoints, run_folder
from vaops.components.train.component import train
from vaops.components.train.config import TrainConfig, get_recipe
from vaops.components.train.synthetic import write_synthetic_latent_dataset
from vaops.components.train.trainer import run
from vaops.models.checkpoint import write_tiny_checkpoint
from vaops.models.config import get_preset

pytestmark = pytest.mark.xdist_group("run-resume")

CONFIG = {"steps": 24, "save_every": 4, "system_metrics": False}
ARGS = ["--demo-episodes", "1", "--demo-time-scale", "0.5", "--eval-shards", "1", "--eval-episodes", "1",
        "--eval-max-steps", "16", "--threshold", "0"]
WEIGHTS = Path("transformer") / "diffusion_pytorch_model.safetensors"


def _start(root: Path, env: dict, config: dict, name: str) -> tuple[subprocess.Popen, Path]:
    console = root.parent / f"{name}.out"
    cmd = [sys.executable, "-m", "vaops.pipelines.cli", "run", "--root", str(root), *ARGS,
           "--train-config", json.dumps(config)]
    with open(console, "w") as out:  # its own session: the kill takes the steps' processes too
        proc = subprocess.Popen(cmd, env=env, cwd=root.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, console


def _wait_for(proc: subprocess.Popen, console: Path, ready, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"vaops run ended before {what}:\n{console.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s:\n{console.read_text()[-3000:]}"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _run_folders(root: Path) -> list[Path]:
    return sorted((root / "train-runs").glob("*-*"))


def _history(uri: str, run_id: str, key: str = "loss") -> tuple[np.ndarray, list[int]]:
    # a resumed run logs again the steps after its checkpoint: the last value counts
    latest: dict[int, tuple[int, float]] = {}
    for m in MlflowClient(uri).get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return np.array([latest[s][1] for s in sorted(latest)]), sorted(latest)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """`vaops run` killed after the first checkpoint, then the same command until its train step ends."""
    work = tmp_path_factory.mktemp("run-resume")
    root = work / "pipeline"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "MUJOCO_GL": "egl"}

    proc, console = _start(root, env, CONFIG, "interrupted")
    checkpoints = lambda: [c for f in _run_folders(root) for c in list_checkpoints(f)]  # noqa: E731
    _wait_for(proc, console, checkpoints, "first training checkpoint")
    _kill(proc)
    [folder] = _run_folders(root)
    saved = [int(p.name.split("-")[1]) for p in list_checkpoints(folder)]
    assert saved and saved[-1] < CONFIG["steps"], f"the kill came too late to interrupt the training: {saved}"
    killed_run = TrainerState.read(list_checkpoints(folder)[-1] / "trainer_state.json").run_id

    proc, console = _start(root, env, CONFIG, "rerun")
    _wait_for(proc, console, lambda: "train: done" in console.read_text(), "end of the train step")
    _kill(proc)
    return {"work": work, "root": root, "uri": uri, "env": env, "folder": folder, "saved": saved[-1],
            "killed_run": killed_run, "console": console.read_text()}


def test_rerun_resumes_the_training_onto_the_uninterrupted_curve(resumed, monkeypatch):
    folder, console = resumed["folder"], resumed["console"]
    for step in ("dataset-source", "base-model", "validate", "clean", "augment", "encode"):
        assert f"{step}: from the cache" in console, console
    assert f"[7/12] train: resuming from step {resumed['saved']} of 24 ({folder}" in console, console
    final = list_checkpoints(folder)[-1]
    state = TrainerState.read(final / "trainer_state.json")
    assert final.name == "step-00000024" and state.run_id == resumed["killed_run"]  # one MLflow run, continued
    [trained] = resumed["root"].glob("vaops-*/train/checkpoint")  # the rerun's step output (the killed run has none)
    assert torch.equal(load_file(str(trained / WEIGHTS))["proj_out.weight"],
                       load_file(str(final / WEIGHTS))["proj_out.weight"])

    # The same training without interruption, in a folder of its own, is the curve to be on.
    key = json.loads((folder / RUN_KEY_FILE).read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", resumed["uri"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the step's process (OMP_NUM_THREADS=1)
    try:
        cfg = TrainConfig.from_dict({**get_recipe("tiny").to_dict(), **CONFIG, "dataset": key["dataset"]["path"],
                                     "init_from": key["init_from"]["path"],
                                     "output": str(resumed["work"] / "uninterrupted")})
        reference = run(cfg)
    finally:
        torch.set_num_threads(threads)
    for metric in ("loss", "video_loss", "action_loss"):
        values, steps = _history(resumed["uri"], state.run_id, metric)
        expected, _ = _history(resumed["uri"], reference.run_id, metric)
        assert steps == list(range(1, 25))
        np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6, err_msg=metric)
    a = load_file(str(trained / WEIGHTS))
    b = load_file(str(Path(reference.checkpoint) / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in b)


def test_finished_training_is_reused_not_redone(resumed, tmp_path, monkeypatch, capfd):
    # The train step with the same inputs but another execution setting (keep_last), which kfp's
    # cache does not know as the same: the finished run folder serves it without a step of training.
    folder = resumed["folder"]
    key = json.loads((folder / RUN_KEY_FILE).read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", resumed["uri"])
    before = {p.name: p.stat().st_mtime_ns for p in list_checkpoints(folder)}
    checkpoint = dsl.Model(uri=str(tmp_path / "checkpoint"))
    run_id = train.python_func(
        latent_dataset=dsl.Dataset(uri=key["dataset"]["path"]), checkpoint=checkpoint,
        metrics=dsl.Metrics(uri=str(tmp_path / "metrics")), report=dsl.Markdown(uri=str(tmp_path / "report")),
        base_checkpoint=dsl.Model(uri=key["init_from"]["path"]), recipe="tiny", config={**CONFIG, "keep_last": 3},
        tracking_uri=resumed["uri"], work_root=str(resumed["root"] / "train-runs"))
    assert f"training finished earlier (step 24, {folder}): reused, not redone" in capfd.readouterr().out
    assert run_id == resumed["killed_run"] and checkpoint.metadata["steps"] == 24
    assert {p.name: p.stat().st_mtime_ns for p in list_checkpoints(folder)} == before
    assert (tmp_path / "checkpoint" / WEIGHTS).is_file()
    _, steps = _history(resumed["uri"], run_id)
    assert steps == list(range(1, 25))


def test_another_train_config_starts_from_step_0(resumed):
    root, folder = resumed["root"], resumed["folder"]
    before = [p.name for p in list_checkpoints(folder)]
    proc, console = _start(root, resumed["env"], {**CONFIG, "seed": 1}, "other-config")
    others = lambda: [f for f in _run_folders(root) if f != folder and list_checkpoints(f)]  # noqa: E731
    _wait_for(proc, console, others, "checkpoint of the other config's training")
    _kill(proc)
    [other] = others()
    assert list_checkpoints(other)[0].name == "step-00000004"
    state = TrainerState.read(list_checkpoints(other)[0] / "trainer_state.json")
    assert state.run_id != resumed["killed_run"] and state.config["seed"] == 1
    assert "resuming" not in console.read_text() and "[7/12] train: running" in console.read_text()
    assert [p.name for p in list_checkpoints(folder)] == before  # the first run's folder untouched


def test_run_folder_is_named_after_data_base_and_config(tmp_path):
    tiny = get_preset("tiny")
    data = write_synthetic_latent_dataset(tmp_path / "latents", tiny, episodes=2, latent_frames=3, seed=0)
    base = write_tiny_checkpoint(tmp_path / "base", seed=1)
    cfg = {**get_recipe("tiny").to_dict(), "dataset": str(data), "init_from": str(base)}
    root = tmp_path / "runs"
    first = run_folder(root, cfg, 1)
    assert first.name.startswith("tiny-") and json.loads((first / RUN_KEY_FILE).read_text())["world"] == 1
    # how it runs, not what it trains: the same folder
    assert run_folder(root, {**cfg, "keep_last": 5, "save_every": 7, "num_workers": 3, "time_limit_min": 9.0,
                             "system_metrics": False, "output": "elsewhere"}, 1) == first
    # what it trains: another folder
    assert run_folder(root, {**cfg, "lr": 2e-3}, 1) != first
    assert run_folder(root, {**cfg, "steps": 41}, 1) != first
    assert run_folder(root, cfg, 8) != first  # another world size (ZeRO partitions)
    other_base = write_tiny_checkpoint(tmp_path / "base2", seed=2)
    assert run_folder(root, {**cfg, "init_from": str(other_base)}, 1) != first
    assert run_folder(root, {**cfg, "init_from": None}, 1) != first
    copy = shutil.copytree(data, tmp_path / "copy")
    assert run_folder(root, {**cfg, "dataset": str(copy)}, 1) != first  # another artifact
    stats = data / "meta" / "norm_stats.json"
    changed = json.loads(stats.read_text())
    changed["q99"][0] += 1.0
    stats.write_text(json.dumps(changed))  # the same path with other content
    assert run_folder(root, cfg, 1) != first
    assert len(list(root.iterdir())) == 8  # every one above its own
