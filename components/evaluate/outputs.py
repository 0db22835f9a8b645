"""What an evaluation step hands to Kubeflow: metrics, the HTML report and the results' metadata."""

from __future__ import annotations

import shutil

from vaops.components.step_outputs import save_metrics

from .run import EvalResult


def publish(result: EvalResult, metrics, report_path: str, results, **metadata) -> float:
    """Log the success rates, copy the report, tag the results artifact; returns the success rate."""
    summary, report = result.metrics, result.report
    if summary is None or report is None:
        raise ValueError(f"{result.output_dir}: one shard of several has no metrics or report: merge the shards first")
    for name, setting in summary["settings"].items():
        metrics.log_metric(f"success_rate_{name}", setting["success_rate"])
    metrics.log_metric("success_rate", summary["success_rate"])
    metrics.log_metric("episodes", summary["episodes"])
    save_metrics(metrics)
    shutil.copyfile(report["html"], report_path)
    results.metadata.update({"mlflow_run_id": result.mlflow_run_id, **metadata})
    return float(summary["success_rate"])
