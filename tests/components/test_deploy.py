"""`vaops deploy`: the InferenceService manifest for a registered version, checked field by field.
(`vaops deploy --local` serves the registered model: tests/serving/test_registered_server.py.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from vaops.components.deploy.deploy import DeployConfig, run
from vaops.components.deploy.manifest import ManifestSpec, build_manifest, validate_manifest
from vaops.pipelines.cli import main as vaops

pytestmark = pytest.mark.xdist_group("registry")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from vaops.components.register.registry import RegisterConfig
    from vaops.components.register.registry import run as register
    from vaops.models.checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("deploy")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    (root / "metrics.json").write_text(json.dumps({"success_rate": 0.9}))
    register(RegisterConfig(checkpoint=write_tiny_checkpoint(root / "ckpt"), name="Lingbot_VA",
                            metrics=root / "metrics.json"))
    yield root
    mp.undo()


def spec(**kw) -> ManifestSpec:
    return ManifestSpec(name="lingbot-va", storage_uri="s3://models/lingbot-va/1", model_uri="models:/x/1", **kw)


def test_generated_manifest_is_valid_and_complete():
    doc = build_manifest(spec(token_secret="va-token"))
    assert validate_manifest(doc) == ([], [])
    ann = doc["metadata"]["annotations"]
    assert ann["serving.kserve.io/deploymentMode"] == "Standard" and "session affinity" in ann["vaops/session-affinity"]
    pred = doc["spec"]["predictor"]
    assert pred["minReplicas"] == pred["maxReplicas"] == 1
    c = pred["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["startupProbe"]["httpGet"] == {"path": "/v2/models/lingbot-va/ready", "port": 8080}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1800
    env = {e["name"]: e for e in c["env"]}
    assert env["STORAGE_URI"]["value"] == "s3://models/lingbot-va/1"
    assert env["VAOPS_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "va-token", "key": "token"}
    assert c["args"][c["args"].index("--host") + 1] == "0.0.0.0"
    assert "--fp8" not in c["args"] and "--warm-sessions" not in c["args"]  # the defaults add no flags
    args = build_manifest(spec(fp8=True, warm_sessions=4))["spec"]["predictor"]["containers"][0]["args"]
    assert "--fp8" in args and args[args.index("--warm-sessions") + 1] == "4"
    # Compiled kernels on a volume: an emptyDir by default (a restarted container keeps it), or a claim.
    assert c["args"][c["args"].index("--compile-cache") + 1] == "/var/cache/vaops"
    assert c["volumeMounts"] == [{"name": "compile-cache", "mountPath": "/var/cache/vaops"}]
    assert pred["volumes"] == [{"name": "compile-cache", "emptyDir": {}}]
    # SIGTERM drains for --drain-timeout; Kubernetes waits 30 s more before it kills.
    assert c["args"][c["args"].index("--drain-timeout") + 1] == "120"
    assert pred["terminationGracePeriodSeconds"] == 150
    claimed = build_manifest(spec(compile_cache_pvc="vaops-kernels"))
    assert validate_manifest(claimed) == ([], [])
    assert claimed["spec"]["predictor"]["volumes"] == [{"name": "compile-cache",
                                                         "persistentVolumeClaim": {"claimName": "vaops-kernels"}}]


def _fp8_in_float32(doc: dict) -> None:
    args = doc["spec"]["predictor"]["containers"][0]["args"]
    args[args.index("bfloat16")] = "float32"
    args.append("--fp8")


@pytest.mark.parametrize("break_it, error", [
    (lambda d: d["spec"]["predictor"].update(maxReplicas=2), "must pin one replica"),
    (lambda d: d["metadata"]["annotations"].update({"serving.kserve.io/deploymentMode": "Serverless"}), "must be Standard"),
    (lambda d: d["spec"]["predictor"]["containers"][0].pop("startupProbe"), "startupProbe must GET"),
    (lambda d: d["spec"]["predictor"]["containers"][0].update(startupprobe={}), "container.startupprobe: not a Kubernetes"),
    (lambda d: d["spec"]["predictor"].update(replicas=1), "spec.predictor: unknown field 'replicas'"),
    (lambda d: d["metadata"].update(name="Lingbot_VA"), "DNS-1035"),
    (lambda d: d["spec"]["predictor"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"), "nvidia.com/gpu"),
    (lambda d: d["spec"]["predictor"]["containers"][0]["env"].pop(0), "STORAGE_URI"),
    (lambda d: d["metadata"]["annotations"].pop("prometheus.io/scrape"), "prometheus.io/scrape"),
    (_fp8_in_float32, "--fp8 needs a cuda container serving --dtype bfloat16"),
    (lambda d: d["spec"]["predictor"]["volumes"][0].update(emptydir={}),
     "spec.predictor.volumes[0].emptydir: not a Kubernetes volume field"),
    (lambda d: d["spec"]["predictor"].pop("terminationGracePeriodSeconds"),
     "terminationGracePeriodSeconds 30 must exceed --drain-timeout 120"),
    (lambda d: d["spec"]["predictor"].pop("volumes"), "--compile-cache /var/cache/vaops needs a volume mounted there"),
    (lambda d: d["spec"]["predictor"]["volumes"][0].update(emptyDir=None, persistentVolumeClaim={"claimName": "My_PVC"}),
     "claimName 'My_PVC' must be a DNS-1123 subdomain"),
])
def test_validation_names_what_is_wrong(break_it, error):
    doc = copy.deepcopy(build_manifest(spec()))
    break_it(doc)
    errors, _ = validate_manifest(doc)
    assert any(error in e for e in errors), errors


def test_deploy_a_registered_version(registry, tmp_path):
    result = run(DeployConfig(model="models:/Lingbot_VA@champion", output=tmp_path / "isvc.yaml"))
    doc = yaml.safe_load(result.manifest.read_text())
    assert result.manifest.read_text().startswith("# Generated by `vaops deploy`")
    assert doc["metadata"]["name"] == "lingbot-va" and doc["metadata"]["annotations"]["vaops/model-uri"] == "models:/Lingbot_VA/1"
    storage = {e["name"]: e.get("value") for e in doc["spec"]["predictor"]["containers"][0]["env"]}["STORAGE_URI"]
    assert storage == result.storage_uri and storage.startswith("file://")
    assert (Path(storage[len("file://"):]) / "policy.json").is_file()  # the checkpoint folder itself
    assert any("not fetchable from a cluster" in w for w in result.warnings)
    assert vaops(["deploy", "--model", "models:/Lingbot_VA/1", "--storage-uri", "s3://bucket/va/1",
                  "--output", str(tmp_path / "s3.yaml"), "--gpus", "2"]) == 0
    doc = yaml.safe_load((tmp_path / "s3.yaml").read_text())
    assert validate_manifest(doc) == ([], [])
    assert doc["spec"]["predictor"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    with pytest.raises(ValueError, match="not in the model registry"):
        run(DeployConfig(model="models:/Lingbot_VA@staging", output=tmp_path / "none.yaml"))
    assert not (tmp_path / "none.yaml").exists()


def test_kubeflow_component_compiles(tmp_path):
    from kfp import compiler

    from vaops.components.deploy.component import deploy

    compiler.Compiler().compile(deploy, str(tmp_path / "deploy.yaml"))
    spec_ = yaml.safe_load((tmp_path / "deploy.yaml").read_text())
    assert "manifest" in spec_["root"]["outputDefinitions"]["artifacts"]
    assert "vaops.components.deploy.deploy" in spec_["deploymentSpec"]["executors"]["exec-deploy"]["container"]["command"][-1]
