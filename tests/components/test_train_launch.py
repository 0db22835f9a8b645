"""Launch surfaces of training: config and CLI, the Kubeflow Trainer TrainJob manifest, and the
Kubeflow component run by kfp's local runner."""

import argparse
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from vaops.components.train.cli import add_arguments, resolve_config, train_arguments
from vaops.components.train.config import TrainConfig, get_recipe
from vaops.components.train.k8s import API_VERSION, TRAIN_ENTRY, K8sSpec, torchrun_command, train_job
from vaops.components.train.synthetic import write_synthetic_latent_dataset
from vaops.models.config import get_preset
from vaops.pipelines.cli import main as vaops

pytestmark = pytest.mark.xdist_group("train-launch")


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_flags_override_recipe_and_config_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"steps": 7, "lr": 0.01, "chunk_range": [2, 3]}))
    cfg = resolve_config(_parse(["--recipe", "robotwin", "--config", str(path), "--lr", "0.02",
                                 "--zero-stage", "3", "--activation-checkpointing", "false", "--init-from", "none",
                                 "--window-range", "4,16"]))
    assert cfg.preset == "robotwin" and cfg.steps == 7 and cfg.chunk_range == (2, 3)
    assert cfg.lr == 0.02 and cfg.zero_stage == 3 and cfg.activation_checkpointing is False
    assert cfg.window_range == (4, 16) and cfg.init_from is None
    assert cfg.save_every == get_recipe("robotwin").save_every
    # the same generator as the data stages': a boolean also as --flag / --no-flag, a tuple as values
    cfg = resolve_config(_parse(["--no-activation-checkpointing", "--preload", "--betas", "0.8", "0.99"]))
    assert cfg.activation_checkpointing is False and cfg.preload is True and cfg.betas == (0.8, 0.99)
    assert resolve_config(_parse(train_arguments(cfg, "small"))) == cfg


def test_zero3_over_a_compiling_recipe_runs_uncompiled_on_every_entry_point(tmp_path):
    """The robotwin recipe compiles its blocks, which ZeRO-3 cannot run: asking for stage 3 alone gives
    the same uncompiled config through the flags, a config file and the pipeline's dict (kfp: 3.0)."""
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"zero_stage": 3}))
    recipe = get_recipe("robotwin")
    assert recipe.compile_blocks
    configs = [resolve_config(_parse(["--recipe", "robotwin", "--zero-stage", "3"])),
               resolve_config(_parse(["--recipe", "robotwin", "--config", str(path)])),
               TrainConfig.from_dict({"zero_stage": 3.0}, "--train-config", recipe)]
    assert all(c == recipe.replace(zero_stage=3, compile_blocks=False) for c in configs)
    # naming both is a contradiction, refused in one line
    with pytest.raises(ValueError, match="compile_blocks needs zero_stage <= 2"):
        TrainConfig.from_dict({"zero_stage": 3, "compile_blocks": True}, "--train-config", recipe)
    with pytest.raises(ValueError, match="compile_blocks needs zero_stage <= 2"):
        resolve_config(_parse(["--recipe", "robotwin", "--zero-stage", "3", "--compile-blocks"]))


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3"):
        TrainConfig(zero_stage=4)
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        TrainConfig(offload_params=True)
    with pytest.raises(ValueError, match="compile_blocks needs zero_stage <= 2"):
        TrainConfig(compile_blocks=True, zero_stage=3)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match=r"bad.json: unknown field\(s\) 'stepz'; allowed: dataset, output, preset"):
        TrainConfig.from_file(path)
    with pytest.raises(ValueError, match=r"^command line: field 'micro_batch' got 'two' \(Couldn't parse 'two' into"):
        resolve_config(_parse(["--micro-batch", "two"]))
    with pytest.raises(SystemExit, match="--dataset and --output are required"):
        vaops(["train", "--steps", "1"])


def test_emit_k8s_writes_a_trainjob_that_reruns_the_same_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.ml.svc:5000")
    argv = ["--recipe", "robotwin", "--dataset", "/data/latents", "--output", "/data/runs/r1",
            "--init-from", "/data/lingbot-va-base", "--zero-stage", "3", "--micro-batch", "2", "--grad-accum", "4"]
    path = tmp_path / "job.yaml"
    assert vaops(["train", *argv, "--emit-k8s", str(path), "--nodes", "2", "--gpus-per-node", "8",
                  "--k8s-namespace", "ml", "--k8s-name", "lingbot-robotwin", "--k8s-volume", "vaops-data:/data",
                  "--k8s-env", "NCCL_DEBUG=INFO", "--k8s-memory", "512Gi"]) == 0
    job = yaml.safe_load(path.read_text())
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == "lingbot-robotwin" and job["metadata"]["namespace"] == "ml"
    assert job["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime"}
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 8, "memory": "512Gi"}
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and env["HF_HUB_OFFLINE"] == "1"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.ml.svc:5000"
    assert trainer["command"][:4] == ["torchrun", "--no-python", "vaops", "train"]
    # The job's arguments are this command's training configuration, exactly.
    assert resolve_config(_parse(trainer["command"][4:])) == resolve_config(_parse(argv))
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and patch["manager"] == "vaops"
    assert pod["volumes"] == [{"name": "vol-0", "persistentVolumeClaim": {"claimName": "vaops-data"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "vol-0", "mountPath": "/data"}]}]


def test_trainjob_takes_a_pipeline_steps_task_config():
    passthrough = {"resources": {"limits": {"nvidia.com/gpu": 4}}, "env": [{"name": "A", "value": "1"}],
                   "volumes": [{"name": "ws", "persistentVolumeClaim": {"claimName": "kfp-ws"}}],
                   "volume_mounts": [{"name": "ws", "mountPath": "/kfp-workspace"}],
                   "tolerations": [{"key": "gpu", "operator": "Exists"}], "node_selector": None}
    job = train_job(K8sSpec(gpus_per_node=4), train_arguments(get_recipe("tiny"), "tiny"), passthrough)
    trainer = job["spec"]["trainer"]
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 4}}
    assert {"name": "A", "value": "1"} in trainer["env"]
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "kfp-ws"
    assert pod["containers"][0]["volumeMounts"] == [{"name": "ws", "mountPath": "/kfp-workspace"}]
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}] and "nodeSelector" not in pod
    assert train_arguments(get_recipe("tiny"), "tiny") == ["--recipe", "tiny"]


def test_trainjob_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="DNS label"):
        K8sSpec(name="Train_Job")
    with pytest.raises(ValueError, match="CLAIM:/absolute/mount/path"):
        K8sSpec(volumes=("data",))
    with pytest.raises(ValueError, match="nodes must be >= 1"):
        K8sSpec(nodes=0)


def test_kubeflow_component_trains_locally(tmp_path, monkeypatch):
    from kfp import dsl, local

    from vaops.components.train.component import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    dataset = write_synthetic_latent_dataset(tmp_path / "latents", get_preset("tiny"), episodes=2, latent_frames=3)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))

    @dsl.pipeline
    def pipeline(path: str) -> str:
        latents = dsl.importer(artifact_uri=path, artifact_class=dsl.Dataset, reimport=False)
        return train(latent_dataset=latents.output, config={"steps": 2, "save_every": 2,
                                                            "system_metrics": False}).outputs["Output"]

    run_id = pipeline(path=str(dataset)).output
    task_dir = next((tmp_path / "root").glob("pipeline-*/train"))
    checkpoint = task_dir / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["policy.json", "transformer"]
    executor = json.loads((task_dir / "executor_output.json").read_text())
    assert executor["parameterValues"]["Output"] == run_id
    assert (task_dir / "report").read_text().startswith(f"# Training run `{run_id}`")
    assert os.path.isfile(task_dir / "checkpoint-run" / "outputs.json")


CRD = Path(__file__).resolve().parents[1] / "fixtures" / "kubeflow_trainer" / "trainer.kubeflow.org_trainjobs.yaml"


def _pruned_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would drop without a word: keys that a structural schema with
    `properties` does not name (and no additionalProperties or x-kubernetes-preserve-unknown-fields)."""
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _pruned_fields(v, schema.get("items", {}), f"{path}[{i}]")]
    if not isinstance(value, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if "properties" not in schema:
        extra = schema.get("additionalProperties")
        return [p for k, v in value.items() for p in _pruned_fields(v, extra, f"{path}.{k}")] if isinstance(
            extra, dict) else []
    props = schema["properties"]
    return [f"{path}.{k}" for k in value if k not in props] + [
        p for k, v in value.items() if k in props for p in _pruned_fields(v, props[k], f"{path}.{k}")]


@pytest.fixture(scope="module")
def trainjob_crd() -> dict:
    return yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@pytest.mark.parametrize("nodes,gpus", [(1, 1), (2, 8), (4, 4)])
def test_trainjob_matches_kubeflow_trainers_crd(trainjob_crd, nodes, gpus):
    """The emitted TrainJob for N nodes x G GPUs against the TrainJob CRD's openAPIV3Schema from
    kubeflow/trainer (tests/fixtures/kubeflow_trainer): valid, no field the server would prune, the
    CRD's CEL rules on the name and processes per node, and torchrun over `vaops train` as command."""
    import jsonschema

    crd = trainjob_crd
    group, version = API_VERSION.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == "TrainJob"
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = served["schema"]["openAPIV3Schema"]
    passthrough = {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
                   "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
                   "volume_mounts": [{"name": "shm", "mountPath": "/dev/shm"}]}
    spec = K8sSpec(name=f"robotwin-{nodes}x{gpus}", namespace="ml", nodes=nodes, gpus_per_node=gpus,
                   volumes=("vaops-data:/data",), env=("NCCL_DEBUG=WARN",), cpu="32", memory="512Gi")
    cfg = get_recipe("robotwin").replace(dataset="/data/latents", output="/data/runs/r1")
    job = train_job(spec, train_arguments(cfg, "robotwin"), passthrough)
    jsonschema.Draft7Validator(schema).validate(job)
    assert _pruned_fields(job, schema) == []
    rules = [v["rule"] for v in schema["x-kubernetes-validations"]]
    (pattern,) = [m.group(1) for r in rules if (m := re.search(r"name\.matches\('(.+)'\)", r))]
    assert re.fullmatch(pattern, job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 63
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == nodes and trainer["numProcPerNode"] == gpus >= 1
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == gpus
    # torchrun (the runtime's PET_* variables give nodes, processes and rendezvous) over `vaops train`:
    # the launcher bench/train_step.py measures through (tests/components/test_train_bench.py).
    assert trainer["command"] == torchrun_command([*TRAIN_ENTRY, *train_arguments(cfg, "robotwin")], no_python=True)
    assert resolve_config(_parse(trainer["command"][len(TRAIN_ENTRY) + 2:])) == cfg
    # The schema does hold: a wrong type, and a misspelled field the server would drop.
    bad = json.loads(json.dumps(job))
    bad["spec"]["trainer"]["numNodes"] = str(nodes)
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'integer'"):
        jsonschema.Draft7Validator(schema).validate(bad)
    bad["spec"]["trainer"]["numProcsPerNode"] = bad["spec"]["trainer"].pop("numProcPerNode")
    assert _pruned_fields(bad, schema) == [".spec.trainer.numProcsPerNode"]
