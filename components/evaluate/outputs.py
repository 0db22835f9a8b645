"""What an evaluation step hands to Kubeflow: metrics, the HTML report and the results' metadata."""

from __future__ import annotations

import shutil

from vaops.components.step_outputs import save_metrics

from .run import EvalResult


def publish(result: EvalResult, metrics, report_path: str, results, **metadata) -> float:
    """Log the success rates, copy the report, tag the results artifact; returns the success rate."""
    for name, setting in result.metrics["settings"].items():
        metrics.log_metric(f"success_rate_{name}", setting["success_rate"])
    metrics.log_metric("success_rate", result.metrics["success_rate"])
    metrics.log_metric("episodes", result.metrics["episodes"])
    save_metrics(metrics)
    shutil.copyfile(result.report["html"], report_path)
    results.metadata.update({"mlflow_run_id": result.mlflow_run_id, **metadata})
    return float(result.metrics["success_rate"])
