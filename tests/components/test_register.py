"""`vaops register` against a real MLflow store (SQLite), a real git repository and real DVC."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from vaops.components.register.gate import decide
from vaops.components.register.registry import RegisterConfig, run

pytestmark = pytest.mark.xdist_group("registry")


def sh(*cmd: str, cwd: Path) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A git+DVC repository with a tracked dataset, an MLflow store with a training run, and a
    checkpoint that carries that run id and optimizer state next to its serving parts."""
    from vaops.models.checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("register")
    repo = root / "repo"
    (repo / "data" / "demos").mkdir(parents=True)
    (repo / "data" / "demos" / "episode_0.parquet").write_bytes(b"frames")
    sh("git", "init", "-q", cwd=repo)
    sh("git", "config", "user.email", "t@example.com", cwd=repo)
    sh("git", "config", "user.name", "t", cwd=repo)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=repo)
    sh(sys.executable, "-m", "dvc", "add", "-q", "data/demos", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "-m", "data", cwd=repo)

    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    with mlflow.start_run(run_name="train") as train:
        mlflow.log_metric("loss", 0.1)
    checkpoint = write_tiny_checkpoint(root / "step-00000010", seed=0)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 10, "run_id": train.info.run_id}))
    (checkpoint / "training").mkdir()
    (checkpoint / "training" / "optimizer.pt").write_bytes(b"pickled optimizer state")
    yield {"root": root, "repo": repo, "train_run": train.info.run_id, "checkpoint": checkpoint}
    mp.undo()


def register(world, success_rate: float | None, name: str = "va", operating_point: str | None = None, **kw):
    metrics = None
    if success_rate is not None:
        metrics = world["root"] / f"metrics-{success_rate}.json"
        metrics.write_text(json.dumps({"success_rate": success_rate, "episodes": 20, "settings": {"clean": {}},
                                       "identity": {"suite": "aloha", "operating_point": operating_point}}))
    return run(RegisterConfig(checkpoint=world["checkpoint"], name=name, metrics=metrics, threshold=0.5,
                              data=world["repo"] / "data" / "demos", repo=world["repo"], **kw))


def test_lineage_and_the_champion_gate(world, capsys):
    client = MlflowClient()
    out = world["root"] / "decision"
    first = register(world, 0.6, output=out)
    assert first.decision.promote and first.version == "1"
    tags = client.get_model_version("va", "1").tags
    pointer = yaml.safe_load((world["repo"] / "data" / "demos.dvc").read_text())
    assert tags["vaops.git_commit"] == sh("git", "rev-parse", "HEAD", cwd=world["repo"])
    assert tags["vaops.git_dirty"] == "false"
    assert tags["vaops.data_md5"] == pointer["outs"][0]["md5"] and tags["vaops.data_md5"].endswith(".dir")
    assert tags["vaops.data_git_rev"] == tags["vaops.git_commit"]
    assert tags["vaops.train_run_id"] == world["train_run"]  # read from trainer_state.json
    assert tags["eval.success_rate"] == "0.6" and tags["eval.episodes"] == "20.0"
    assert tags["eval.operating_point"] == "released"  # the evaluation named none: the model's own
    assert tags["gate.verdict"] == "promoted"
    assert str(client.get_model_version_by_alias("va", "champion").version) == "1"
    recorded = mlflow.artifacts.load_dict(f"runs:/{first.run_id}/gate_decision.json")
    assert recorded == json.loads((out / "gate_decision.json").read_text())
    assert recorded["verdict"] == "promoted" and recorded["version"] == "1"
    assert recorded["reason"] == "success_rate 0.6 >= threshold 0.5: promoted"
    logged = Path(mlflow.artifacts.download_artifacts("models:/va/1", dst_path=str(world["root"] / "dl")))
    files = {p.relative_to(logged).as_posix() for p in logged.rglob("*") if p.is_file()}
    assert "artifacts/checkpoint/transformer/diffusion_pytorch_model.safetensors" in files
    assert "artifacts/checkpoint/policy.json" in files and "pyfunc.py" in files
    assert not any("training" in f or f.endswith(".pt") for f in files)  # optimizer state stays behind

    worse = register(world, 0.55, operating_point="paper")
    assert client.get_model_version("va", worse.version).tags["eval.operating_point"] == "paper"
    assert not worse.decision.promote
    assert "below the champion's (version 1) 0.6000" in " ".join(worse.decision.reasons)
    assert client.get_model_version("va", worse.version).tags["gate.reason"] == (
        "success_rate 0.55 >= threshold 0.5, < champion (version 1) 0.6: not promoted")
    low = register_cli(world, 0.4, world["root"] / "low")
    assert not low["promote"] and "below the threshold 0.5000" in low["reasons"][0]
    assert low["reason"] == "success_rate 0.4 < threshold 0.5: not promoted"
    assert json.loads((world["root"] / "low" / "gate_decision.json").read_text())["reason"] == low["reason"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"gate: {low['reason']}"
    missing = register(world, None)
    assert not missing.decision.promote and "no evaluation metric" in missing.decision.reasons[0]
    assert str(client.get_model_version_by_alias("va", "champion").version) == "1"
    assert client.get_model_version("va", worse.version).tags["gate.verdict"] == "rejected"
    tie = register(world, 0.6)
    assert tie.decision.promote
    assert str(client.get_model_version_by_alias("va", "champion").version) == tie.version == "5"


def register_cli(world, success_rate: float, output: Path) -> dict:
    """`vaops register` as a user runs it; its stdout is the decision as JSON."""
    from vaops.pipelines.cli import main

    metrics = world["root"] / f"metrics-{success_rate}.json"
    metrics.write_text(json.dumps({"success_rate": success_rate, "episodes": 20}))
    code = main(["register", str(world["checkpoint"]), "--name", "va", "--metrics", str(metrics), "--threshold", "0.5",
                 "--data", str(world["repo"] / "data" / "demos"), "--repo", str(world["repo"]),
                 "--output", str(output)])
    assert code == 0
    return json.loads((output / "gate_decision.json").read_text())


def test_pyfunc_by_alias_runs_the_policy(world):
    from vaops.models.checkpoint import load_weights

    register(world, 0.9, name="pyfunc-va")
    model = mlflow.pyfunc.load_model("models:/pyfunc-va@champion")
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    got = model.predict({"observation.images.top": images}, params={"prompt": "pick up the cube", "seed": 4})
    assert got.shape == (2, 14, 2, 16) and got.dtype == np.float32
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["observation.images.top"] and sig.params.to_dict()[0]["name"] == "prompt"
    weights = load_weights(world["checkpoint"])
    for row in range(2):
        policy = weights.new_policy()
        policy.reset("pick up the cube", seed=4 + row)
        np.testing.assert_array_equal(got[row], policy.act({"observation.images.top": images[row]}).actions)


def test_bad_inputs_are_refused_before_anything_is_registered(world, tmp_path):
    client = MlflowClient()
    before = len(client.search_model_versions("name='va'"))
    pickled = shutil.copytree(world["checkpoint"], tmp_path / "pickled")
    (pickled / "transformer" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"pickled weights \['transformer/pytorch_model.bin'\]"):
        run(RegisterConfig(checkpoint=pickled, name="va"))
    with pytest.raises(FileNotFoundError, match="metrics file does not exist"):
        run(RegisterConfig(checkpoint=world["checkpoint"], name="va", metrics=tmp_path / "none.json"))
    with pytest.raises(ValueError, match="training run 'feedbeef' is not in the MLflow store"):
        run(RegisterConfig(checkpoint=world["checkpoint"], name="va", train_run_id="feedbeef"))
    with pytest.raises(ValueError, match="not tracked by DVC"):
        run(RegisterConfig(checkpoint=world["checkpoint"], name="va", data=world["repo"] / "data", repo=world["repo"]))
    with pytest.raises(FileNotFoundError, match=r"checkpoint lacks \['vae'\]"):
        shutil.rmtree(pickled / "vae")
        run(RegisterConfig(checkpoint=pickled, name="va"))
    assert len(client.search_model_versions("name='va'")) == before


def test_gate_rules():
    assert decide(0.7, None, None, 0.5).promote
    assert decide(0.7, 0.7, "3", 0.5).promote
    assert not decide(0.69, 0.7, "3", 0.5).promote
    assert not decide(0.49, None, None, 0.5).promote
    assert not decide(float("nan"), None, None, 0.5).promote
    assert decide(0.6, None, "2", 0.5).promote  # a champion without the metric yields to a passing candidate
    assert decide(0.01, None, None, 0.5).reason == "success_rate 0.01 < threshold 0.5: not promoted"
    assert decide(0.7, 0.7, "3", 0.5).reason == "success_rate 0.7 >= threshold 0.5, >= champion (version 3) 0.7: promoted"
    assert decide(None, None, None, 0.5, "sr").reason == "sr missing from the evaluation (threshold 0.5): not promoted"


def test_kubeflow_component_compiles(tmp_path):
    from kfp import compiler

    from vaops.components.images import CPU_IMAGE
    from vaops.components.register.component import register as component

    compiler.Compiler().compile(component, str(tmp_path / "register.yaml"))
    spec = yaml.safe_load((tmp_path / "register.yaml").read_text())
    executor = spec["deploymentSpec"]["executors"]["exec-register"]["container"]
    assert executor["image"] == CPU_IMAGE
    assert set(spec["root"]["inputDefinitions"]["artifacts"]) == {"checkpoint", "evaluation", "training_data"}
    assert spec["root"]["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "BOOLEAN"  # the verdict
    assert "vaops.components.register.registry" in executor["command"][-1]
