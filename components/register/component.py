"""Kubeflow wrapper of the register stage (a lightweight component running in the vaops image)."""

from kfp import dsl

from vaops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(checkpoint: dsl.Input[dsl.Model], evaluation: dsl.Input[dsl.Artifact], decision: dsl.Output[dsl.Artifact],
             training_data: dsl.Input[dsl.Dataset] = None, model_name: str = "lingbot-va",
             metric: str = "success_rate", threshold: float = 0.5, train_run_id: str = "",
             tracking_uri: str = "") -> bool:
    """Registers the checkpoint with the evaluation's metrics.json; the evaluation's HTML report goes
    into the register run, and the data lineage in `training_data.metadata["lineage"]` and the
    evaluation's MLflow run (`evaluation.metadata["mlflow_run_id"]`) become tags of the version.
    Writes gate_decision.json into `decision` (metadata: verdict, version, model_uri); returns
    whether the gate promoted the version (a single output, so that a condition can test it)."""
    import os
    from pathlib import Path

    from mlflow import MlflowClient

    from vaops.components.register.registry import RegisterConfig, run
    from vaops.models.model_source import tracking_uri as store_uri

    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    result = run(RegisterConfig(checkpoint=Path(checkpoint.path), metrics=Path(evaluation.path) / "metrics.json",
                                name=model_name, metric=metric, threshold=threshold,
                                train_run_id=train_run_id or None, output=Path(decision.path)))
    print(f"gate: {result.decision.reason}")  # in the step's log
    client = MlflowClient(store_uri())
    tags = dict(training_data.metadata.get("lineage", {})) if training_data is not None else {}
    if evaluation.metadata.get("mlflow_run_id"):
        tags["vaops.eval_run_id"] = evaluation.metadata["mlflow_run_id"]
    for key, value in tags.items():
        client.set_model_version_tag(result.name, result.version, key, str(value))
    report = Path(evaluation.path) / "report.html"
    if report.is_file():
        client.log_artifact(result.run_id, str(report), "evaluation")
    decision.metadata.update({"verdict": result.decision.verdict, "version": result.version,
                              "model_uri": result.model_uri})
    return result.decision.promote
