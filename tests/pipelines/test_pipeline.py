"""The Kubeflow pipeline: its compiled YAML through kfp's own loader; one local run (kfp.local) from
a DVC-versioned dataset to a served champion, made with the demo's own functions at the smallest
sizes and started through `vaops run` from a base checkpoint folder (`vaops demo --base-checkpoint`'s
start); a rerun that comes from the cache; a second run in the same root from a base checkpoint in
the MLflow registry (models:/name@alias; the step resolves models:/name/version too), its data steps
from the cache; the base-model step's own starts (a shipped policy; random weights with VAE
statistics fitted on the data); a failing step named with its reason, in one line with the path of
its full log; a submission to a Kubeflow Pipelines API (a recording HTTP endpoint: there is no
cluster here).

A local run takes a few minutes on 2 cores: the tests share these two."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from vaops.models.config import get_preset
from vaops.pipelines import cli
from vaops.pipelines import run as run_module
from vaops.pipelines.demo import (
    DemoConfig,
    _manifest,
    ask,
    champion_version,
    data_registry,
    pipeline_arguments,
    run_pipeline,
    sample_requests,
)
from vaops.pipelines.pipeline import STAGES
from vaops.pipelines.run import PipelineFailed, run_local

heavy = pytest.mark.xdist_group("pipeline")


def _flags(arguments: dict) -> list[str]:
    """Pipeline parameters as `vaops run` flags (`--train-config '{"steps": 2}'`)."""
    return [item for name, value in arguments.items()
            for item in (f"--{name.replace('_', '-')}", json.dumps(value) if isinstance(value, dict) else str(value))]


_PRINT = builtins.print  # as the process started


def _vaops_run(root: Path, arguments: dict, **env: str):
    """`vaops run --root ROOT` with `arguments` as its flags: its exit code, the LocalRun it made (it
    prints it, but returns only its exit code; None when it failed), its stdout and its stderr."""
    runs, out, err = [], io.StringIO(), io.StringIO()

    def recorded(*args, **kwargs):
        runs.append(run_local(*args, **kwargs))
        return runs[-1]

    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out), redirect_stderr(err):
        mp.setattr(run_module, "run_local", recorded)
        for name, value in env.items():
            mp.setenv(name, value)
        code = cli.main(["run", "--root", str(root), *_flags(arguments)])
    return code, (runs[0] if runs else None), out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's flow at its smallest: a DVC registry with one recorded episode, then the pipeline
    on it through `vaops run`, with the demo's parameters as flags, from a tiny base checkpoint folder."""
    from vaops.models.checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(root=root, base_checkpoint=write_tiny_checkpoint(root / "base", seed=7), episodes=1,
                     time_scale=0.5, train_steps=2, eval_max_steps=16, model_name="lingbot-va-test",
                     pipeline={"augment_copies": 1})
    rev = data_registry(cfg)
    code, run, _, err = _vaops_run(cfg.pipeline_root, pipeline_arguments(cfg, rev))
    assert code == 0, err[-3000:]
    return cfg, rev, run


@pytest.fixture(scope="module")
def registered(demo):
    """Another tiny base checkpoint, version 1 of `base-model` in the demo's registry, alias `released`."""
    from mlflow import MlflowClient

    from vaops.components.register.registry import RegisterConfig
    from vaops.components.register.registry import run as register
    from vaops.models.checkpoint import write_tiny_checkpoint

    cfg = demo[0]
    base = write_tiny_checkpoint(cfg.root / "registered-base", seed=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", cfg.tracking_uri)
        version = register(RegisterConfig(checkpoint=base, name="base-model", threshold=0.0)).version
    MlflowClient(cfg.tracking_uri).set_registered_model_alias("base-model", "released", version)
    return base, version


# The run from the registry: one training step, one 8-step transfer-cube episode in one shard, and a
# gate of 1 that the random model does not pass (registered, not promoted: no deploy).
ALIAS_RUN = {"base_checkpoint": "models:/base-model@released", "model_name": "trained-from-alias",
             "train_config": {"steps": 1}, "eval_preset": "transfer_cube", "eval_shards": 1, "eval_episodes": 1,
             "eval_max_steps": 8, "threshold": 1.0}


@pytest.fixture(scope="module")
def alias_run(demo, registered):
    """`vaops run` in the demo's root, on the same data, from models:/base-model@released."""
    cfg, rev, _ = demo
    code, run, out, err = _vaops_run(cfg.pipeline_root, {**pipeline_arguments(cfg, rev), **ALIAS_RUN},
                                     VAOPS_MODEL_CACHE=str(cfg.root / "model-cache"))
    assert code == 0, err[-3000:]
    return run, out


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _registered_checkpoint(cfg: DemoConfig, name: str) -> Path:
    """The newest version of `name` in the demo's registry, resolved as models:/name/version."""
    from mlflow import MlflowClient

    from vaops.models.model_source import resolve_checkpoint

    latest = max(MlflowClient(cfg.tracking_uri).search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    return resolve_checkpoint(f"models:/{name}/{latest.version}")


def _assert_trained_from(base: Path, trained: Path) -> None:
    """`trained` carries `base`'s encoders (its latents were made with them), and its transformer
    started from `base`'s weights: a step or two later they differ a little."""
    from safetensors.torch import load_file

    for part in ("vae", "text_encoder", "tokenizer"):
        assert _digest(trained / part) == _digest(base / part), part
    before = load_file(str(base / "transformer" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(trained / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys()
    assert all(bool((before[k] - after[k]).abs().max() < 0.05) for k in before)
    assert not all(bool((before[k] == after[k]).all()) for k in before)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def test_compiled_yaml_loads_with_kfp_and_lists_every_stage(tmp_path):
    from google.protobuf import json_format
    from kfp.components import load_component_from_file
    from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s

    path = tmp_path / "pipeline.yaml"
    assert cli.main(["pipeline", "compile", "--output", str(path), "--volume", "vaops-data"]) == 0
    pipeline = load_component_from_file(str(path))
    spec = pipeline.pipeline_spec
    assert spec.pipeline_info.name == "vaops"
    assert set(spec.deployment_spec["executors"]) == {f"exec-{s}" for s in STAGES}
    tasks = spec.root.dag.tasks
    assert {"dataset-source", "base-model", "validate", "clean", "augment", "encode", "train", "shard-names",
            "merge", "register"} <= set(tasks)
    assert all(t.caching_options.enable_cache for t in tasks.values() if t.component_ref.name.startswith("comp-")
               and not t.component_ref.name.startswith(("comp-for-loop", "comp-condition")))
    loop = next(t for name, t in tasks.items() if name.startswith("for-loop"))
    assert loop.parameter_iterator.items.input_parameter == "pipelinechannel--shard-names-Output"
    assert "evaluate" in spec.components[loop.component_ref.name].dag.tasks
    gate = next(t for name, t in tasks.items() if name.startswith("condition"))
    assert "register-Output" in gate.trigger_policy.condition
    assert "deploy" in spec.components[gate.component_ref.name].dag.tasks
    assert pipeline.component_spec.inputs["preset"].default == "tiny"
    assert pipeline.component_spec.inputs["dvc_repo"].default == ""  # sim demos unless a repository is given

    docs = list(yaml.safe_load_all(path.read_text()))
    executors = docs[0]["deploymentSpec"]["executors"]
    for stage in ("encode", "train"):
        assert executors[f"exec-{stage}"]["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert "resources" not in executors["exec-validate"]["container"]
    assert all(e["container"]["image"].startswith("vaops/components:") for e in executors.values())
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for config in platform.values():  # each parses as kfp-kubernetes' own message, unknown fields refused
        json_format.ParseDict(config, k8s.KubernetesExecutorConfig())
    assert platform["exec-train"]["pvcMount"][0]["constant"] == "vaops-data"
    assert platform["exec-train"]["secretAsEnv"][0]["optional"] is True
    assert {"exec-train", "exec-encode", "exec-register", "exec-evaluate"} <= set(platform)
    assert "pvcMount" not in platform["exec-register"]


def test_bad_parameter_is_refused_by_name(capsys):
    assert cli.main(["run", "--eval-shards", "two"]) == 2
    assert capsys.readouterr().err == ("vaops run: error: pipeline parameters: field 'eval_shards' got 'two' "
                                       "(Couldn't parse 'two' into an int)\n")
    assert cli.main(["run", "--train-config", "{steps: 3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vaops run: error: --train-config: '{steps: 3' is not a YAML/JSON value (")


def test_every_stage_config_is_checked_before_any_step_runs(capsys, monkeypatch):
    """A typo in --train-config, an unknown stage preset or a bad value stops `vaops run` (local or
    --host) with one line naming the stage, the field and the value, before the first step."""
    monkeypatch.setattr(run_module, "run_local", lambda *a, **k: pytest.fail("a step ran"))
    monkeypatch.setattr(run_module, "submit", lambda *a, **k: pytest.fail("submitted"))
    for flags, line in (
            (["--train-config", '{"stepz": 3}'], "stage 'train': --train-config: unknown field(s) 'stepz'; allowed: "
                                                 "dataset, output, preset,"),
            (["--train-config", '{"precision": "fp16"}'],
             "stage 'train': --train-config: field 'precision' got 'fp16' (must be one of 'auto', 'bf16', 'fp32')"),
            (["--clean-preset", "alhoa"], "stage 'clean': unknown clean preset 'alhoa'; choose one of "),
            (["--eval-preset", "smoke", "--eval-episodes", "-1"], "stage 'evaluate': episodes must be >= 1, got -1"),
            (["--host", "http://127.0.0.1:1", "--robot", "ur5"], "stage 'encode': unknown robot 'ur5'")):
        assert cli.main(["run", *flags]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"vaops run: error: {line}"), err


@heavy
def test_local_run_from_dvc_data_to_a_served_champion(demo, monkeypatch):
    from mlflow import MlflowClient

    cfg, rev, run = demo
    # kfp.local's steps ran in threads, each swapping builtins.print: the run leaves the process's own
    assert builtins.print is _PRINT
    assert run.outputs["promoted"] is True and run.cached == []
    assert 0.0 <= run.outputs["success_rate"] <= 1.0
    assert "Closed-loop evaluation" in Path(run.outputs["evaluation"].path).read_text()
    for name in ("validation", "cleaning", "augmentation", "training"):
        assert Path(run.outputs[name].path).stat().st_size > 0, name
    decision = json.loads((Path(run.outputs["gate"].path) / "gate_decision.json").read_text())
    assert decision["verdict"] == "promoted" and decision["threshold"] == 0.0
    assert _manifest(cfg) is not None  # the deploy step ran under the gate's condition

    # the dataset: tracked by DVC at the commit the pipeline ingested, its data in the remote
    pointer = yaml.safe_load(_git(cfg.registry, "show", f"{rev}:{cfg.dataset}.dvc"))
    status = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "--cloud"], cwd=cfg.registry,
                            capture_output=True, text=True, check=True).stdout
    assert "in sync" in status
    md5 = pointer["outs"][0]["md5"]
    assert (cfg.remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()  # the dataset's listing, pushed

    # the registry: champion alias, lineage, evaluation metrics and report
    version = champion_version(cfg)
    tags = version.tags
    assert tags["vaops.data_git_rev"] == rev
    assert tags["vaops.data_md5"] == pointer["outs"][0]["md5"]
    assert tags["vaops.data_path"] == cfg.dataset and tags["vaops.data_repo"] == str(cfg.registry)
    assert tags["vaops.git_commit"] != "unknown" and tags["gate.verdict"] == "promoted"
    assert float(tags["eval.success_rate"]) == run.outputs["success_rate"]
    client = MlflowClient(cfg.tracking_uri)
    train = client.get_run(tags["vaops.train_run_id"])
    assert train.data.metrics  # the training run's losses
    evaluation = client.get_run(tags["vaops.eval_run_id"])
    assert evaluation.data.tags["model_run_id"] == train.info.run_id
    assert evaluation.data.metrics["episodes"] == 2  # one per ALOHA task, over two shards
    assert "report.html" in {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert "evaluation/report.html" in {a.path for a in client.list_artifacts(version.run_id, "evaluation")}

    # the champion served from the registry answers an episode start
    from vaops.components.evaluate.local_server import LocalPolicyServer

    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking_uri)
    monkeypatch.setenv("VAOPS_MODEL_CACHE", str(cfg.root / "serve-model-cache"))
    preset = get_preset("tiny")
    reset, act = sample_requests(cfg)
    with LocalPolicyServer(cfg.champion, cfg.root / "serve.log") as server:
        answer = ask(f"http://127.0.0.1:{server.port}", "lingbot-va", reset, act)
    assert answer["shape"] == [len(preset.used_action_channels), preset.frame_chunk_size, preset.action_per_frame]
    assert answer["session_id"] == "demo-curl" and answer["values"] == 14 * 2 * 16


@heavy
def test_the_champion_started_from_the_base_checkpoint_folder(demo, tmp_path, monkeypatch):
    from vaops.models.model_source import resolve_checkpoint

    cfg = demo[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking_uri)
    monkeypatch.setenv("VAOPS_MODEL_CACHE", str(tmp_path / "model-cache"))
    _assert_trained_from(cfg.base_checkpoint, resolve_checkpoint(cfg.champion))


@heavy
def test_rerun_resumes_from_the_cache(demo):
    from mlflow import MlflowClient

    cfg, rev, first = demo
    versions = len(MlflowClient(cfg.tracking_uri).search_model_versions(f"name='{cfg.model_name}'"))
    again = run_pipeline(cfg, rev)
    assert sorted(set(again.cached)) == sorted(STAGES)  # every step, both evaluation shards included
    assert again.cached.count("evaluate") == 2
    assert {k: getattr(v, "path", v) for k, v in again.outputs.items()} == \
        {k: getattr(v, "path", v) for k, v in first.outputs.items()}
    assert len(MlflowClient(cfg.tracking_uri).search_model_versions(f"name='{cfg.model_name}'")) == versions


@heavy
def test_a_failing_step_is_named_with_its_reason(tmp_path, capsys):
    missing = tmp_path / "no-such-repo"
    with pytest.raises(PipelineFailed) as failed:
        run_local({"dvc_repo": str(missing), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, tmp_path / "root")
    assert failed.value.step == "dataset-source"
    assert str(missing) in failed.value.reason and "cannot fetch" in failed.value.reason
    assert str(failed.value).startswith("step 'dataset-source' failed: DatasetError: ")


@heavy
def test_a_run_from_a_registry_alias_takes_the_data_steps_from_the_cache(demo, registered, alias_run, tmp_path,
                                                                         monkeypatch):
    cfg = demo[0]
    run, out = alias_run
    assert {"dataset-source", "validate", "clean", "augment"} <= set(run.cached)
    assert not {"base-model", "encode", "train", "evaluate", "merge", "register"} & set(run.cached)
    assert run.outputs["promoted"] is False and "promoted: False" in out
    assert _manifest(cfg) is not None and len(list(cfg.pipeline_root.glob("*/deploy/manifest"))) == 1  # no deploy
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking_uri)
    monkeypatch.setenv("VAOPS_MODEL_CACHE", str(tmp_path / "model-cache"))
    _assert_trained_from(registered[0], _registered_checkpoint(cfg, "trained-from-alias"))


def test_base_model_step_resolves_a_registry_version(demo, registered, tmp_path, monkeypatch):
    """The step itself, for `models:/name/version` (the run above gives it `@alias`)."""
    from kfp import dsl

    from vaops.pipelines.steps import base_model

    cfg = demo[0]
    base, version = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking_uri)  # the step sets it from tracking_uri
    monkeypatch.setenv("VAOPS_MODEL_CACHE", str(tmp_path / "model-cache"))
    out = dsl.Model(name="model", uri=str(tmp_path / "model"), metadata={})
    assert base_model.python_func(model=out, base_checkpoint=f"models:/base-model/{version}", preset="tiny",
                                  tracking_uri=cfg.tracking_uri) == "tiny"
    assert _digest(Path(out.path)) == _digest(base)
    assert out.metadata == {"source": f"models:/base-model/{version}", "preset": "tiny"}
    with pytest.raises(ValueError, match="'tiny' checkpoint, but the pipeline's preset is 'robotwin'"):
        base_model.python_func(model=dsl.Model(name="model", uri=str(tmp_path / "other"), metadata={}),
                               base_checkpoint=str(base), preset="robotwin", tracking_uri=cfg.tracking_uri)


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
def test_base_model_step_fits_random_weights_to_the_data(demo, tmp_path):
    """No base checkpoint: the preset's random weights (its own seed), the VAE's latent statistics
    fitted on the data (the demo's recorded episode), so that its latents come out zero-mean and
    unit-scale."""
    import torch
    from kfp import dsl

    from vaops.components.dataset import LeRobotData
    from vaops.components.encode.calibrate import CALIBRATION_FRAMES
    from vaops.models.checkpoint import write_random_checkpoint
    from vaops.models.observation import frames_to_video
    from vaops.models.vae import latent_stats, load_vae
    from vaops.pipelines.steps import base_model

    cfg = demo[0]
    data = cfg.registry / cfg.dataset
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


@heavy
def test_a_failing_base_model_step_reports_its_exception_and_log_in_one_line(demo, tmp_path):
    cfg, rev, _ = demo
    broken = tmp_path / "broken-base"
    (broken / "transformer").mkdir(parents=True)  # no policy.json: not a checkpoint
    code, run, _, err = _vaops_run(cfg.pipeline_root, {**pipeline_arguments(cfg, rev), "base_checkpoint": str(broken)})
    assert code == 1 and run is None
    lines = [line for line in err.splitlines() if line.startswith("vaops run:")]
    assert len(lines) == 1, lines
    log = cfg.pipeline_root / "logs" / "base-model.log"
    assert lines[0] == (f"vaops run: step 'base-model' failed: FileNotFoundError: {broken}: not a checkpoint folder "
                        f"(policy.json is missing) (full log: {log})")
    assert "Traceback (most recent call last):" in log.read_text()

    with pytest.raises(PipelineFailed) as failed:
        run_local({**pipeline_arguments(cfg, rev), "base_checkpoint": "models:/no-such-model@champion"},
                  cfg.pipeline_root)
    assert failed.value.step == "base-model" and failed.value.log == log
    assert failed.value.reason.startswith("FileNotFoundError: models:/no-such-model@champion: not in the model registry")


class _KubeflowAPI(BaseHTTPRequestHandler):
    """The Kubeflow Pipelines v2beta1 endpoints a submission uses, recording what it is sent."""

    runs: ClassVar[list[dict]] = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.startswith("/apis/v2beta1/healthz"):
            return self._reply({"multi_user": False})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiments": [{"experiment_id": "exp-1", "display_name": "vaops"}]})
        self.send_error(404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path.startswith("/apis/v2beta1/runs"):
            self.runs.append(body)
            return self._reply({"run_id": "run-1", "display_name": body.get("display_name"),
                                "experiment_id": "exp-1"})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_run_with_host_submits_the_pipeline_to_kubeflow(capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KubeflowAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        assert cli.main(["run", "--host", host, "--demo-episodes", "3", "--train-config", '{"steps": 5}',
                         "--volume", "vaops-data"]) == 0
    finally:
        server.shutdown()
    assert "submitted run run-1" in capsys.readouterr().out
    (run,) = _KubeflowAPI.runs
    assert run["experiment_id"] == "exp-1"
    spec, platform = run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    assert spec["pipelineInfo"]["name"] == "vaops"
    assert set(spec["deploymentSpec"]["executors"]) == {f"exec-{s}" for s in STAGES}
    assert spec["root"]["inputDefinitions"]["parameters"]["device"]["defaultValue"] == "cuda"  # GPU steps
    assert run["runtime_config"]["parameters"] == {"demo_episodes": 3, "train_config": {"steps": 5}}
    train = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert train["pvcMount"][0]["constant"] == "vaops-data"
