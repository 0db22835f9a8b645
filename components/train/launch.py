"""Launch a training from a Kubeflow Pipelines step: a TrainJob on the cluster, waited for
(in-cluster credentials), or several ranks on the step's own machine (one GPU each, torchrun)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vaops.components.tracebacks import describe_failure

from .cli import train_arguments
from .config import TrainConfig
from .k8s import API_VERSION, K8sSpec, torchrun_command, train_job

GROUP, VERSION = API_VERSION.split("/")
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def run_train_job(cfg: TrainConfig, recipe: str, name: str, nodes: int, gpus_per_node: int, passthrough: dict,
                  poll_s: float = 30.0) -> dict:
    """Create the TrainJob, wait until it completes, return its `outputs.json` (from `cfg.output`,
    which the job writes on a shared volume)."""
    from kubernetes import client, config

    config.load_incluster_config()
    namespace = NAMESPACE_FILE.read_text().strip()
    spec = K8sSpec(name=name, namespace=namespace, nodes=nodes, gpus_per_node=gpus_per_node)
    api = client.CustomObjectsApi()
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, "trainjobs",
                                        train_job(spec, train_arguments(cfg, recipe), passthrough))
    while True:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, "trainjobs", name)
        states = {c["type"]: c for c in job.get("status", {}).get("conditions", []) if c.get("status") == "True"}
        if "Failed" in states:
            raise RuntimeError(f"TrainJob {namespace}/{name} failed: {states['Failed'].get('message', '')}")
        if "Complete" in states:
            break
        time.sleep(poll_s)
    outputs = output_folder(cfg) / "outputs.json"
    if not outputs.is_file():
        raise FileNotFoundError(f"{outputs}: the TrainJob finished but its outputs are not on the shared volume")
    return json.loads(outputs.read_text())


def output_folder(cfg: TrainConfig) -> Path:
    """The run's output folder; the launchers set it before starting ranks or a TrainJob."""
    if not cfg.output:
        raise ValueError("the train config names no output folder")
    return Path(cfg.output)


def run_local_ranks(cfg: TrainConfig, recipe: str, processes: int, keep_lines: int = 400) -> dict:
    """Train with `processes` ranks on this machine (torchrun, one GPU each: the same entry point
    as a TrainJob) and return its `outputs.json`. The ranks' output goes to this process's stdout;
    a failure raises with the first failing rank's exception, not just torchrun's exit code."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    cmd = torchrun_command(["-m", "vaops.pipelines.cli", "train", *train_arguments(cfg, recipe)], no_python=False,
                           nproc_per_node=processes, standalone=True,
                           launcher=(sys.executable, "-m", "torch.distributed.run"))
    tail: collections.deque[str] = collections.deque(maxlen=keep_lines)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          env=dict(os.environ, PYTHONUNBUFFERED="1")) as proc:
        for line in proc.stdout or ():
            sys.stdout.write(line)
            tail.append(line)
    sys.stdout.flush()
    if proc.returncode:
        # torchrun's own ChildFailedError comes last and only says which rank died.
        reason = describe_failure(tail, ignore=("ChildFailedError",)) or "no output"
        raise RuntimeError(f"training on {processes} local ranks failed (exit code {proc.returncode}): {reason}")
    outputs = output_folder(cfg) / "outputs.json"
    if not outputs.is_file():
        raise FileNotFoundError(f"{outputs}: the ranks finished but wrote no outputs")
    return json.loads(outputs.read_text())
