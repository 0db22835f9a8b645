"""Kubeflow component of `vaops train` (lightweight Python component).

`num_nodes == 0`: trains inside the step (DeepSpeed in one process; the step's own GPU if it has
one). `num_nodes >= 1`: launches a Kubeflow Trainer `TrainJob` of `num_nodes` x `gpus_per_node`
running the same entry point, forwarding the step's resources, env, volumes and scheduling through
kfp's TaskConfig passthrough, and waits for it; `config["output"]` must then be a path on a
volume both the step and the job mount. Outputs: the final checkpoint (servable: transformer/,
policy.json, and the base's vae/ text_encoder/ tokenizer/), the metrics, the Markdown report;
returns the MLflow run id.
"""

from kfp import dsl

from vaops.components.images import GPU_IMAGE


@dsl.component(
    base_image=GPU_IMAGE, install_kfp_package=False,
    task_config_passthroughs=[
        dsl.TaskConfigField.RESOURCES,
        dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
        dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR,
        dsl.TaskConfigField.KUBERNETES_AFFINITY,
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.ENV, apply_to_task=True),
        dsl.TaskConfigPassthrough(field=dsl.TaskConfigField.KUBERNETES_VOLUMES, apply_to_task=True),
    ])
def train(latent_dataset: dsl.Input[dsl.Dataset], checkpoint: dsl.Output[dsl.Model],
          metrics: dsl.Output[dsl.Metrics], report: dsl.Output[dsl.Markdown],
          base_checkpoint: dsl.Input[dsl.Model] = None, recipe: str = "tiny", config: dict = {},
          num_nodes: int = 0, gpus_per_node: int = 8, job_name: str = "vaops-train", tracking_uri: str = "",
          task_config: dsl.TaskConfig = None) -> str:
    import dataclasses
    import json
    import os
    import shutil
    from pathlib import Path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from vaops.components.step_outputs import save_metrics
    from vaops.components.train.checkpointing import servable_items
    from vaops.components.train.config import TrainConfig, get_recipe

    fields = {**config, "dataset": latent_dataset.path}
    fields.setdefault("output", str(Path(checkpoint.path).with_name(Path(checkpoint.path).name + "-run")))
    if base_checkpoint is not None:
        fields["init_from"] = base_checkpoint.path
    cfg = TrainConfig.from_dict({**get_recipe(recipe).to_dict(), **fields}, source="train component config")

    if num_nodes == 0:
        from vaops.components.train.trainer import run

        outputs = dataclasses.asdict(run(cfg))
    else:
        from vaops.components.train.launch import run_train_job

        passthrough = dataclasses.asdict(task_config) if task_config is not None else {}
        outputs = run_train_job(cfg, recipe, job_name, num_nodes, gpus_per_node, passthrough)

    Path(checkpoint.path).mkdir(parents=True, exist_ok=True)
    for item in servable_items(Path(outputs["checkpoint"])):
        if item.is_dir():
            shutil.copytree(item, Path(checkpoint.path) / item.name)
        else:
            shutil.copy2(item, Path(checkpoint.path) / item.name)
    summary = json.loads((Path(outputs["report"]).parent / "metrics.json").read_text())
    for key, value in summary.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, value)
    save_metrics(metrics)
    shutil.copyfile(outputs["report"], report.path)
    checkpoint.metadata.update({"mlflow_run_id": outputs["run_id"], "steps": outputs["steps"],
                                "final_loss": outputs["final_loss"]})
    return outputs["run_id"]
