"""Logging an evaluation to MLflow, linked to the run that trained the model.

The store is `--tracking-uri`, else the default every stage uses (MLFLOW_TRACKING_URI, else
SQLite in the working directory with artifacts in `mlartifacts/`).
"""

from __future__ import annotations

from pathlib import Path

from vaops.components.train.tracking import STAGE_TAG, experiment_id
from vaops.models.model_source import tracking_uri

from .config import TrackingConfig

MODEL_RUN_TAG = "model_run_id"


def model_run_tags(config: TrackingConfig) -> dict[str, str]:
    """The tags linking to the model's run, which must exist in the store (checked before an
    evaluation starts, not after hours of it)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not config.model_run_id:
        return {}
    uri = config.tracking_uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model_run = mlflow.get_run(config.model_run_id)
    except MlflowException:
        raise ValueError(f"--model-run-id {config.model_run_id!r}: no such run in the MLflow store {uri}") from None
    return {MODEL_RUN_TAG: config.model_run_id, "model_experiment_id": model_run.info.experiment_id}


def log_evaluation(config: TrackingConfig, folder: Path, metrics: dict[str, float], params: dict,
                   artifacts: list[Path]) -> str:
    """One MLflow run with the metrics, parameters and report files; returns its run id."""
    import mlflow

    tags = {STAGE_TAG: "evaluate", **model_run_tags(config)}
    uri = config.tracking_uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id(config.experiment, uri), run_name=config.run_name,
                          tags=tags) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics(metrics)
        for path in map(Path, artifacts):
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.relative_to(folder).as_posix())
            elif path.exists():
                parent = path.parent.relative_to(folder).as_posix()
                mlflow.log_artifact(str(path), artifact_path=None if parent == "." else parent)
    return run.info.run_id
