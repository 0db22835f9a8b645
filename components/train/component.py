"""Kubeflow component of `vaops train` (lightweight Python component).

`num_nodes == 0`: trains inside the step (DeepSpeed in one process; the step's own GPU if it has
one). `num_nodes >= 1`: launches a Kubeflow Trainer `TrainJob` of `num_nodes` x `gpus_per_node`
running the same entry point, forwarding the step's resources, env, volumes and scheduling through
kfp's TaskConfig passthrough, and waits for it; the run folder must then be on a volume both the
step and the job mount. Outputs: the final checkpoint (servable: transformer/, policy.json, and the
base's vae/ text_encoder/ tokenizer/), the metrics, the Markdown report; returns the MLflow run id.

The run folder (checkpoints with their training state, the report) is `config["output"]` when
given; else, with `work_root`, `<work_root>/<preset>-<hash>` named after what the run trains (the
latent dataset, the base checkpoint, the config but its execution fields, the world size: see
checkpointing.run_folder), so a rerun of an interrupted step resumes from its last checkpoint, a
finished training is reused instead of redone, and any other data or config starts a folder of its
own; else a folder beside the step's checkpoint output (new every run: no resume). The step says
`vaops notice: resuming from step N ...` when it resumes (`vaops run` shows it on the console).
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
          work_root: str = "", task_config: dsl.TaskConfig = None) -> str:
    import dataclasses
    import json
    import os
    import shutil
    from pathlib import Path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from vaops.components.step_outputs import save_metrics
    from vaops.components.train import checkpointing
    from vaops.components.train.checkpointing import servable_items
    from vaops.components.train.config import TrainConfig, get_recipe
    from vaops.components.train.trainer import finished_outputs

    fields = {**config, "dataset": latent_dataset.path}
    if base_checkpoint is not None:
        fields["init_from"] = base_checkpoint.path
    cfg = TrainConfig.from_dict(fields, source="train component config", base=get_recipe(recipe))
    own_folder = cfg.output is None  # else the caller's folder: resumed, never cleared
    if cfg.output is not None:
        output = Path(cfg.output)
    else:
        world = num_nodes * gpus_per_node if num_nodes else 1
        output = (checkpointing.run_folder(Path(work_root), cfg.to_dict(), world) if work_root
                  else Path(checkpoint.path).with_name(Path(checkpoint.path).name + "-run"))
        cfg = cfg.replace(output=str(output))

    done = finished_outputs(output, cfg.steps)
    latest = checkpointing.latest_checkpoint(output) if done is None else None
    if latest is not None and not (latest / checkpointing.ENGINE_STATE).is_dir() and own_folder:
        # Weights only (save_training_state false): nothing to resume from in a folder of our own.
        print(f"vaops notice: {latest.name} in {output} holds no training state: training from step 0", flush=True)
        shutil.rmtree(output / checkpointing.CHECKPOINTS)
        latest = None
    if done is not None:
        print(f"vaops notice: training finished earlier (step {done.steps}, {output}): reused, not redone",
              flush=True)
        outputs = dataclasses.asdict(done)
    else:
        if latest is not None:
            step = checkpointing.TrainerState.read(latest / checkpointing.STATE_FILE).step
            print(f"vaops notice: resuming from step {step} of {cfg.steps} ({latest})", flush=True)
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
