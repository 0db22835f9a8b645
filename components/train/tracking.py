"""MLflow tracking of a training run (rank 0 only).

The store is MLFLOW_TRACKING_URI, else SQLite in the working directory (`mlflow.db`, artifacts in
`mlartifacts/`), the default the other stages use. A resumed run logs into the MLflow run it
continues, so its curves are one run's curves.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from vaops.models.model_source import artifact_root, tracking_uri

STAGE_TAG = "vaops.stage"
FLUSH_METRICS = 200  # MLflow takes up to 1000 per batch
FLUSH_SECONDS = 30.0


def experiment_id(name: str, uri: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_root(uri))


class Tracker:
    def __init__(self, experiment: str, run_name: str | None, run_id: str | None, system_metrics: bool,
                 system_metrics_interval: float):
        self.uri = tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        if system_metrics:
            mlflow.set_system_metrics_sampling_interval(system_metrics_interval)
        if run_id is None:
            run = mlflow.start_run(experiment_id=experiment_id(experiment, self.uri), run_name=run_name,
                                   tags={STAGE_TAG: "train"}, log_system_metrics=system_metrics)
        else:
            run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
        self.run_id = run.info.run_id
        self.client = MlflowClient(self.uri)
        self._pending: list[Metric] = []
        self._flushed = time.monotonic()

    def log_params(self, params: dict) -> None:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffered: one store call per `FLUSH_METRICS` values or `FLUSH_SECONDS` (a remote store
        costs tens of ms per call). The trainer flushes before every checkpoint, so a killed run
        keeps its curve up to its last checkpoint and the resumed run re-logs the steps after it."""
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self._pending) >= FLUSH_METRICS or time.monotonic() - self._flushed > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.client.log_batch(self.run_id, metrics=self._pending)
            self._pending = []
        self._flushed = time.monotonic()

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def log_artifact(self, path: Path, artifact_path: str) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) per step; a step logged twice (before a kill and after the resume) keeps
        the later value. Logged values are visible after `flush`."""
        latest: dict[int, tuple[int, float]] = {}
        for m in self.client.get_metric_history(self.run_id, key):
            if m.step not in latest or m.timestamp >= latest[m.step][0]:
                latest[m.step] = (m.timestamp, m.value)
        return [(s, v) for s, (_, v) in sorted(latest.items())]

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        mlflow.end_run(status=status)
