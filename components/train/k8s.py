"""Kubeflow Trainer v2 `TrainJob` for training beyond one machine.

The job runs the same entry point (`vaops train ...`) under torchrun on N nodes x G GPUs through
the `torch-distributed` ClusterTrainingRuntime, which sets torchrun's PET_* rendezvous variables;
DeepSpeed joins that process group. Volumes (dataset, output, checkpoints: paths in the train
arguments are paths inside the pods) are mounted with a runtime patch (Trainer >= 2.2 API).
"""

from __future__ import annotations

import os
import re
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vaops.components.images import GPU_IMAGE
from vaops.models.atomic import write_text_atomically

API_VERSION = "trainer.kubeflow.org/v1alpha1"
TORCHRUN = ("torchrun",)
TRAIN_ENTRY = ("vaops", "train")  # the program every rank runs (the `vaops` console script)
TRAINER_CONTAINER = "node"  # the trainer job and container name in the torch-distributed runtime
PATCH_MANAGER = "vaops"


@dataclass(frozen=True)
class K8sSpec:
    name: str = "vaops-train"
    namespace: str | None = None
    image: str = GPU_IMAGE
    nodes: int = 1
    gpus_per_node: int = 8
    runtime: str = "torch-distributed"
    volumes: tuple[str, ...] = ()  # "claim:/mount/path"
    env: tuple[str, ...] = ()  # "KEY=VALUE"
    cpu: str | None = None  # per node, e.g. "32"
    memory: str | None = None  # per node, e.g. "512Gi"
    forwarded_env: tuple[str, ...] = field(default=("MLFLOW_TRACKING_URI",))  # copied from this environment

    def __post_init__(self):
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name) or len(self.name) > 63:
            raise ValueError(f"TrainJob name {self.name!r} must be a DNS label (a-z, 0-9, '-', <= 63 characters)")
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")
        for v in self.volumes:
            claim, _, mount = v.partition(":")
            if not claim or not mount.startswith("/"):
                raise ValueError(f"volume {v!r} must be CLAIM:/absolute/mount/path")
        for e in self.env:
            if "=" not in e or not e.split("=", 1)[0]:
                raise ValueError(f"env {e!r} must be KEY=VALUE")


def torchrun_command(program: list[str], *, no_python: bool, nproc_per_node: int | None = None,
                     standalone: bool = False, launcher: tuple[str, ...] = TORCHRUN) -> list[str]:
    """torchrun over `program` (an executable with `no_python`, else a Python script and its arguments).
    In a TrainJob the runtime's PET_* variables give the node count, processes per node and the
    rendezvous; on one machine `standalone` and `nproc_per_node` do (bench/train_step.py, local ranks)."""
    cmd = [*launcher]
    if standalone:
        cmd.append("--standalone")
    if nproc_per_node is not None:
        cmd.append(f"--nproc-per-node={nproc_per_node}")
    if no_python:
        cmd.append("--no-python")
    return [*cmd, *program]


def train_job(spec: K8sSpec, train_args: list[str], passthrough: dict | None = None) -> dict:
    """The TrainJob manifest. `passthrough` carries a Kubeflow Pipelines step's TaskConfig fields
    (resources, env, volumes, volume_mounts, tolerations, node_selector, affinity) to the job."""
    extra = {k: v for k, v in (passthrough or {}).items() if v}
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update({k: os.environ[k] for k in spec.forwarded_env if os.environ.get(k)})
    for item in spec.env:
        key, value = item.split("=", 1)
        env[key] = value
    env_list = [{"name": k, "value": str(v)} for k, v in env.items()]
    env_list += [e for e in extra.get("env", []) if e.get("name") not in env]
    resources: dict = {}
    if spec.gpus_per_node:
        resources["limits"] = {"nvidia.com/gpu": spec.gpus_per_node}
    requests = {k: v for k, v in (("cpu", spec.cpu), ("memory", spec.memory)) if v}
    if requests:
        resources["requests"] = requests
        resources.setdefault("limits", {}).update(requests)
    resources = extra.get("resources") or resources
    trainer = {
        "image": spec.image,
        "command": torchrun_command([*TRAIN_ENTRY, *train_args], no_python=True),
        "numNodes": spec.nodes,
        "numProcPerNode": max(1, spec.gpus_per_node),
        "env": env_list,
    }
    if resources:
        trainer["resourcesPerNode"] = resources
    metadata = {"name": spec.name, "labels": {"app.kubernetes.io/part-of": "vaops", "vaops.stage": "train"}}
    if spec.namespace:
        metadata["namespace"] = spec.namespace
    job: dict[str, Any] = {"apiVersion": API_VERSION, "kind": "TrainJob", "metadata": metadata,
                           "spec": {"runtimeRef": {"name": spec.runtime, "apiGroup": "trainer.kubeflow.org",
                                                   "kind": "ClusterTrainingRuntime"},
                                    "trainer": trainer}}
    volumes, mounts = [], []
    for i, v in enumerate(spec.volumes):
        claim, _, mount = v.partition(":")
        volumes.append({"name": f"vol-{i}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"vol-{i}", "mountPath": mount})
    volumes += extra.get("volumes", [])
    mounts += extra.get("volume_mounts", [])
    pod: dict = {}
    if volumes:
        pod["volumes"] = volumes
    if mounts:
        pod["containers"] = [{"name": TRAINER_CONTAINER, "volumeMounts": mounts}]
    for key, field_name in (("tolerations", "tolerations"), ("node_selector", "nodeSelector"),
                            ("affinity", "affinity")):
        if key in extra:
            pod[field_name] = extra[key]
    if pod:
        job["spec"]["runtimePatches"] = [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                {"name": TRAINER_CONTAINER, "template": {"spec": {"template": {"spec": pod}}}}]}}},
        }]
    return job


def write_manifest(path: str | Path, manifest: dict) -> Path:
    return write_text_atomically(path, yaml.safe_dump(manifest, sort_keys=False))
