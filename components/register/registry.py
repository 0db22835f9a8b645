"""The register stage: a checkpoint folder becomes an MLflow model version with its lineage, and
the promotion gate decides whether it becomes the `champion`.

The model is a models-from-code pyfunc (`pyfunc.py`, nothing pickled) with the checkpoint's
serving parts (safetensors weights, configs, tokenizer, policy.json) as the artifact `checkpoint`.
The registry is MLflow's: MLFLOW_TRACKING_URI, else SQLite in the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from vaops.models.atomic import link_or_copy, write_text_atomically
from vaops.models.checkpoint import POLICY_FILE, read_preset
from vaops.models.config import Preset
from vaops.models.model_source import CHECKPOINT_ARTIFACT, WEIGHT_PARTS, artifact_root, refuse_pickles, tracking_uri

from .gate import GateDecision, decide
from .lineage import Lineage, data_revision, git_state, read_metrics, read_operating_point, train_run_from_checkpoint

SERVING_PARTS = (*WEIGHT_PARTS, POLICY_FILE)
DECISION_FILE = "gate_decision.json"
EVAL_TAG_PREFIX = "eval."
MODEL_NAME = "policy"


@dataclass(frozen=True)
class RegisterConfig:
    checkpoint: Path = field(metadata={"flag": None})  # `vaops register CHECKPOINT`: an argument, not a flag
    name: str = field(default="lingbot-va", metadata={"help": "registered model name"})
    metrics: Path | None = field(default=None, metadata={"help": "the evaluation's metrics.json"})
    metric: str = field(default="success_rate", metadata={"help": "the metric the promotion gate compares"})
    threshold: float = field(default=0.5, metadata={
        "help": "promote only at or above this value (and at least the current champion's)"})
    train_run_id: str | None = field(default=None, metadata={
        "help": "MLflow run that trained it (default: from trainer_state.json)"})
    data: Path | None = field(default=None, metadata={
        "help": "the DVC-tracked training dataset (its .dvc file or folder)"})
    repo: Path = field(default=Path("."), metadata={"help": "git/DVC repository root"})
    experiment: str = "vaops-register"
    alias: str = "champion"
    output: Path | None = field(default=None, metadata={"help": "folder for gate_decision.json"})


@dataclass(frozen=True)
class RegisterResult:
    name: str
    version: str
    run_id: str
    model_uri: str  # models:/<name>/<version>
    decision: GateDecision


def check_checkpoint(folder: Path) -> Preset:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: checkpoint folder does not exist")
    missing = [p for p in SERVING_PARTS if not (folder / p).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: checkpoint lacks {missing}")
    return read_preset(refuse_pickles(folder))


def signature(preset: Preset):
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), c.key) for c in preset.cameras])
    shape = (-1, len(preset.used_action_channels), preset.frame_chunk_size, preset.action_per_frame)
    outputs = Schema([TensorSpec(np.dtype(np.float32), shape, "actions")])
    params = ParamSchema([ParamSpec("prompt", "string", ""), ParamSpec("seed", "long", 0)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _requirements() -> list[str]:
    pins = []
    for dist in ("torch", "numpy", "safetensors", "diffusers", "transformers", "sentencepiece", "mlflow"):
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pins.append(dist)
    return pins



def _stage_serving_parts(checkpoint: Path, into: Path) -> Path:
    """The serving parts only (optimizer state and the like stay behind), hard-linked where possible:
    MLflow copies the artifact anyway and refuses symbolic links."""
    staged = into / CHECKPOINT_ARTIFACT
    staged.mkdir()
    for part in SERVING_PARTS:
        src = checkpoint / part
        if src.is_dir():
            shutil.copytree(src, staged / part, copy_function=link_or_copy)
        else:
            link_or_copy(str(src), str(staged / part))
    return staged


def _staging_dir(checkpoint: Path) -> str | None:
    """Next to the checkpoint when writable (same file system, so hard links work)."""
    parent = checkpoint.resolve().parent
    return str(parent) if os.access(parent, os.W_OK) else None


def _champion(client, name: str, alias: str, metric: str) -> tuple[str | None, float | None]:
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None, None
    value = version.tags.get(EVAL_TAG_PREFIX + metric)
    return str(version.version), None if value is None else float(value)


def run(config: RegisterConfig) -> RegisterResult:
    import mlflow
    from mlflow import MlflowClient

    checkpoint = Path(config.checkpoint)
    preset = check_checkpoint(checkpoint)
    if not 0.0 <= config.threshold <= 1.0:
        raise ValueError(f"threshold {config.threshold} must be in [0, 1]")
    metrics = read_metrics(config.metrics) if config.metrics else {}
    commit, dirty = git_state(Path(config.repo))
    lineage = Lineage(commit, dirty, data_revision(config.data, Path(config.repo)) if config.data else None,
                      config.train_run_id or train_run_from_checkpoint(checkpoint))

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = mlflow.get_experiment_by_name(config.experiment)
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(
        config.experiment, artifact_location=artifact_root(uri))
    if lineage.train_run_id:
        try:
            client.get_run(lineage.train_run_id)
        except mlflow.exceptions.MlflowException:
            raise ValueError(f"training run {lineage.train_run_id!r} is not in the MLflow store {uri}") from None

    tags = {**lineage.tags(), "vaops.stage": "register", "vaops.preset": preset.name}
    if config.metrics:  # which of the policy's sampling settings the gate's numbers were measured with
        tags[EVAL_TAG_PREFIX + "operating_point"] = read_operating_point(config.metrics)
    with tempfile.TemporaryDirectory(prefix=".vaops-register-", dir=_staging_dir(checkpoint)) as tmp, \
            mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{config.name}", tags=tags) as run_:
        mlflow.log_params({"checkpoint": str(checkpoint.resolve()), "preset": preset.name,
                           "threshold": config.threshold, "gate_metric": config.metric})
        if metrics:
            mlflow.log_metrics(metrics)
        with warnings.catch_warnings():
            # The signature is given explicitly; an input example would run the policy while logging.
            warnings.filterwarnings("ignore", message=".*(type hints to the `predict`|input example was not).*")
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(Path(__file__).with_name("pyfunc.py")),
                artifacts={CHECKPOINT_ARTIFACT: str(_stage_serving_parts(checkpoint, Path(tmp)))},
                signature=signature(preset), pip_requirements=_requirements(), registered_model_name=config.name)
        version = str(info.registered_model_version)
        for key, value in {**tags, **{EVAL_TAG_PREFIX + k: str(v) for k, v in metrics.items()}}.items():
            client.set_model_version_tag(config.name, version, key, value)

        champion_version, champion_value = _champion(client, config.name, config.alias, config.metric)
        decision = decide(metrics.get(config.metric), champion_value, champion_version, config.threshold, config.metric)
        record = {**decision.to_dict(), "name": config.name, "version": version, "alias": config.alias}
        client.set_model_version_tag(config.name, version, "gate.verdict", decision.verdict)
        client.set_model_version_tag(config.name, version, "gate.reasons", "; ".join(decision.reasons))
        client.set_model_version_tag(config.name, version, "gate.reason", decision.reason)
        mlflow.log_dict(record, DECISION_FILE)
        mlflow.set_tags({"gate.verdict": decision.verdict, "gate.reason": decision.reason})
        if decision.promote:
            client.set_registered_model_alias(config.name, config.alias, version)
    if config.output is not None:
        write_text_atomically(Path(config.output) / DECISION_FILE, json.dumps(record, indent=2) + "\n")
    return RegisterResult(config.name, version, run_.info.run_id, f"models:/{config.name}/{version}", decision)
