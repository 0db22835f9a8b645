"""`vaops run --base-checkpoint`: training starts from a version in the MLflow registry
(models:/name@alias through `vaops run`, models:/name/version through the step) and encode uses its
VAE; without one, the step's random weights get VAE statistics fitted on the data; a step that fails
says so in one line with its exception and the path of its full log. The same from a checkpoint
folder is test_pipeline.py's run (the demo's flow, from a tiny base checkpoint folder).

The runs share one root, so the data steps come from the cache after the first run; one demo
episode, one training step, one short evaluation episode."""

from __future__ import annotations

import hashlib
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from vaops.pipelines import cli
from vaops.pipelines.run import PipelineFailed, run_local

heavy = pytest.mark.xdist_group("pipeline")
# One transfer-cube episode of 8 steps in one shard: the run's evaluation, merge, gate and deploy run,
# their results are test_pipeline.py's to check.
SMALL = ["--demo-episodes", "1", "--demo-time-scale", "0.5", "--train-config", '{"steps": 1}', "--eval-shards", "1",
         "--eval-preset", "transfer_cube", "--eval-episodes", "1", "--eval-max-steps", "8", "--threshold", "0"]


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


@pytest.fixture(scope="module")
def alias_run(setup):
    """`vaops run` from models:/base-model@released; the module's later runs reuse its data steps."""
    root, uri, _, _ = setup
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["run", "--root", str(root / "pipeline"), "--base-checkpoint", "models:/base-model@released",
                         "--model-name", "trained-from-alias", "--tracking-uri", uri, *SMALL])
    assert code == 0, err.getvalue()[-3000:]
    return out.getvalue()


@heavy
def test_run_starts_from_a_registered_base_checkpoint(setup, alias_run):
    _, uri, base, _ = setup
    assert "pipeline finished" in alias_run
    trained = _registered_checkpoint(uri, "trained-from-alias")
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
    assert not all(bool((before[k] == after[k]).all()) for k in before)


@heavy
def test_base_model_step_fits_random_weights_to_the_data(setup, alias_run, tmp_path):
    """No base checkpoint: the preset's random weights (its own seed), the VAE's latent statistics
    fitted on the run's dataset, so that the data's latents come out zero-mean and unit-scale."""
    import torch
    from kfp import dsl

    from vaops.components.dataset import LeRobotData
    from vaops.components.encode.calibrate import CALIBRATION_FRAMES
    from vaops.models.checkpoint import write_random_checkpoint
    from vaops.models.config import get_preset
    from vaops.models.observation import frames_to_video
    from vaops.models.vae import latent_stats, load_vae
    from vaops.pipelines.steps import base_model

    root = setup[0]
    (data,) = (root / "pipeline").glob("*/dataset-source/dataset")  # the demos the run above recorded
    out = dsl.Model(name="model", uri=str(tmp_path / "model"), metadata={})
    assert base_model.python_func(model=out, preset="tiny",
                                  calibration_data=dsl.Dataset(name="dataset", uri=str(data), metadata={})) == "tiny"
    made, random = Path(out.path), write_random_checkpoint(tmp_path / "random", "tiny")
    same = {k: v for k, v in _digest(random).items() if not k.startswith("vae/")}
    assert {k: _digest(made)[k] for k in same} == same  # the preset's seed: only the VAE's statistics differ

    preset = get_preset("tiny")
    camera = preset.cameras[0]
    demos = LeRobotData(data)
    frames = torch.cat([frames_to_video(video[[i for i in CALIBRATION_FRAMES if i < len(video)]], camera.height,
                                        camera.width).transpose(0, 1)
                        for video in (demos.video(m.episode_index, camera.key) for m in demos.episodes)])
    assert out.metadata == {"source": f"random tiny (seed {preset.init_seed}), VAE latent statistics fitted on "
                                      f"{len(frames)} frames", "preset": "tiny"}
    vae = load_vae(made / "vae")
    assert latent_stats(vae) != latent_stats(load_vae(random / "vae"))
    mean, std = (torch.tensor(v) for v in latent_stats(vae))
    with torch.no_grad():
        mu = vae.encode(frames[:, :, None]).latent_dist.mean.transpose(0, 1).reshape(len(mean), -1)
    normalised = (mu - mean[:, None]) / std[:, None]
    torch.testing.assert_close(normalised.mean(1), torch.zeros(len(mean)), atol=1e-3, rtol=0)
    torch.testing.assert_close(normalised.std(1), torch.ones(len(mean)), atol=1e-3, rtol=0)


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
