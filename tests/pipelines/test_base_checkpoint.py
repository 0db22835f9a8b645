"""`vaops run --base-checkpoint`: training starts from a given checkpoint, a folder or a version in
the MLflow registry (models:/name@alias, models:/name/version), and encode uses its VAE; a step that
fails says so in one line with its exception and the path of its full log.

The runs share one root, so the data steps come from the cache after the first run; one demo
episode, one training step, one short evaluation shard."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vaops.pipelines import cli
from vaops.pipelines.run import PipelineFailed, run_local

heavy = pytest.mark.xdist_group("pipeline")
SMALL = ["--demo-episodes", "1", "--demo-time-scale", "0.5", "--train-config", '{"steps": 1}', "--eval-shards", "1",
         "--eval-max-steps", "8", "--threshold", "0"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, monkeypatch_module):
    from mlflow import MlflowClient

    from vaops.components.register.registry import RegisterConfig
    from vaops.components.register.registry import run as register
    from vaops.models.checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("base-ckpt")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch_module.setenv("VAOPS_MODEL_CACHE", str(root / "model-cache"))
    base = write_tiny_checkpoint(root / "base", seed=7)
    version = register(RegisterConfig(checkpoint=base, name="base-model", threshold=0.0)).version
    MlflowClient(uri).set_registered_model_alias("base-model", "released", version)
    return root, uri, base, version


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _registered_checkpoint(uri: str, name: str) -> Path:
    from mlflow import MlflowClient

    from vaops.models.model_source import resolve_checkpoint

    client = MlflowClient(uri)
    latest = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    return resolve_checkpoint(f"models:/{name}/{latest.version}")


@heavy
@pytest.mark.parametrize("source", ["folder", "alias"])
def test_run_starts_from_a_base_checkpoint(setup, source, capsys):
    root, uri, base, _ = setup
    given = str(base) if source == "folder" else "models:/base-model@released"
    name = f"trained-from-{source}"
    assert cli.main(["run", "--root", str(root / "pipeline"), "--base-checkpoint", given, "--model-name", name,
                     "--tracking-uri", uri, *SMALL]) == 0, capsys.readouterr().err
    assert "pipeline finished" in capsys.readouterr().out
    trained = _registered_checkpoint(uri, name)
    # The trained checkpoint carries the base's encoders (its latents were made with them) ...
    for part in ("vae", "text_encoder", "tokenizer"):
        assert _digest(trained / part) == _digest(base / part), part
    # ... and its transformer started from the base's weights (one step later they differ a little).
    from safetensors.torch import load_file

    before = load_file(str(base / "transformer" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(trained / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys()
    close = sum(bool((before[k] - after[k]).abs().max() < 0.05) for k in before)
    assert close == len(before)


def test_base_model_step_resolves_a_registry_version(setup, tmp_path):
    """The step itself, for `models:/name/version` (the run above covers `@alias`)."""
    from kfp import dsl

    from vaops.pipelines.steps import base_model

    _, uri, base, version = setup
    out = dsl.Model(name="model", uri=str(tmp_path / "model"), metadata={})
    assert base_model.python_func(model=out, base_checkpoint=f"models:/base-model/{version}", preset="tiny",
                                  tracking_uri=uri) == "tiny"
    assert _digest(Path(out.path)) == _digest(base)
    with pytest.raises(ValueError, match="'tiny' checkpoint, but the pipeline's preset is 'robotwin'"):
        base_model.python_func(model=dsl.Model(name="model", uri=str(tmp_path / "other"), metadata={}),
                               base_checkpoint=str(base), preset="robotwin", tracking_uri=uri)


def test_base_model_step_accepts_a_shipped_policy(tmp_path, monkeypatch):
    """`--base-checkpoint <shipped folder>` (what `vaops demo` passes): the step's model is the full
    checkpoint again, its encoders rebuilt (the same weights files) and its transformer the shipped one."""
    from kfp import dsl

    from vaops.models.checkpoint import ship_checkpoint, write_tiny_checkpoint
    from vaops.pipelines.steps import base_model

    monkeypatch.setenv("VAOPS_MODEL_CACHE", str(tmp_path / "cache"))
    full = write_tiny_checkpoint(tmp_path / "full", seed=0)
    shipped = ship_checkpoint(full, tmp_path / "shipped", {"commands": []})
    out = dsl.Model(name="model", uri=str(tmp_path / "model"), metadata={})
    assert base_model.python_func(model=out, base_checkpoint=str(shipped), preset="tiny") == "tiny"
    made, original = _digest(Path(out.path)), _digest(full)
    weights = [k for k in original if k.endswith(".safetensors")]
    assert {k: made[k] for k in weights} == {k: original[k] for k in weights}
    assert out.metadata == {"source": str(shipped), "preset": "tiny"}


@heavy
def test_a_failing_step_reports_its_exception_and_log_in_one_line(setup, capsys):
    root, uri, base, _ = setup
    broken = root / "broken-base"
    broken.mkdir(exist_ok=True)
    (broken / "transformer").mkdir(exist_ok=True)  # no policy.json: not a checkpoint
    assert cli.main(["run", "--root", str(root / "pipeline"), "--base-checkpoint", str(broken),
                     "--tracking-uri", uri, *SMALL]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vaops run:")]
    assert len(lines) == 1, lines
    log = root / "pipeline" / "logs" / "base-model.log"
    assert lines[0] == (f"vaops run: step 'base-model' failed: FileNotFoundError: {broken}: not a checkpoint folder "
                        f"(policy.json is missing) (full log: {log})")
    assert "Traceback (most recent call last):" in log.read_text()

    with pytest.raises(PipelineFailed) as failed:
        run_local({"base_checkpoint": "models:/no-such-model@champion", "tracking_uri": uri,
                   **json.loads('{"demo_episodes": 1, "demo_time_scale": 0.5}')}, root / "pipeline")
    assert failed.value.step == "base-model" and failed.value.log == log
    assert failed.value.reason.startswith("FileNotFoundError: models:/no-such-model@champion: not in the model registry")
