"""The Kubeflow pipeline from data to deployment, and `vaops pipeline compile`.

```
dataset-source ─ validate ─ clean ─ augment ─ encode ─ train ─┬ evaluate 0/n ┬ merge ─ register ─┐
base-model ────────────────────────────────────┴───────┘      └ evaluate i/n ┘     [promoted] deploy
```
- dataset-source: `dvc_path` of the git+DVC repository `dvc_repo` at `dvc_rev`, or (no repository,
  the default) scripted-expert demonstrations recorded in the ALOHA sim;
- base-model: `base_checkpoint` (a folder or models:/name@alias), or tiny random weights; encode
  uses its VAE and text encoder and train starts from it, so the trained checkpoint carries the
  encoder its latents were made with;
- evaluate fans out over `eval_shards` shards (ParallelFor), each serving the checkpoint in its
  step; merge makes one report; register applies the champion gate; deploy (the InferenceService
  manifest) runs only when the gate promoted the version.

Every step caches. Train keeps its checkpoints in a run folder under `train_work_root` named after
its data, base checkpoint and config (`vaops run`: <root>/train-runs; compiled with `--volume`: on
it), so a rerun of an interrupted training resumes from its last checkpoint. Kubernetes settings
(GPUs on encode and train, an optional PVC, MLflow credentials from a Secret) come from
`ClusterOptions` at compile time; `kfp.local` ignores them.
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes

from vaops.components.augment.component import augment
from vaops.components.clean.component import clean
from vaops.components.deploy.component import deploy
from vaops.components.encode.component import encode
from vaops.components.evaluate.component import evaluate, merge
from vaops.components.images import GPU_IMAGE
from vaops.components.register.component import register
from vaops.components.train.component import train
from vaops.components.validate.component import validate
from vaops.models.codec import add_config_arguments, config_from_args

from .steps import base_model, dataset_source, shard_names

PIPELINE_NAME = "vaops"
# Data keys of the optional MLflow credentials Secret -> the variables MLflow's client reads.
MLFLOW_SECRET_KEYS = {"uri": "MLFLOW_TRACKING_URI", "username": "MLFLOW_TRACKING_USERNAME",
                      "password": "MLFLOW_TRACKING_PASSWORD", "token": "MLFLOW_TRACKING_TOKEN"}


@dataclass(frozen=True)
class ClusterOptions:
    """What the pipeline asks of Kubernetes (compile time; a local run has no use for it)."""

    gpus: int = field(default=1, metadata={"help": "GPUs of the encode and train steps (0: CPU)"})
    accelerator: str = field(default="nvidia.com/gpu", metadata={"help": "accelerator resource name"})
    volume: str | None = field(default=None, metadata={"help": "PersistentVolumeClaim to mount on the GPU steps"})
    volume_mount: str = field(default="/mnt/vaops", metadata={"help": "where the volume is mounted"})
    mlflow_secret: str = field(default="mlflow-credentials", metadata={
        "help": f"optional Secret with MLflow credentials (keys {', '.join(MLFLOW_SECRET_KEYS)}); '' for none"})

    @property
    def train_work_root(self) -> str:
        """Where the train step keeps its run folders: on the volume, so they outlive the step."""
        return f"{self.volume_mount.rstrip('/')}/train-runs" if self.volume else ""

    def __post_init__(self):
        if self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")
        if self.volume is not None and not self.volume_mount.startswith("/"):
            raise ValueError(f"volume_mount must be an absolute path, got {self.volume_mount!r}")


LOCAL = ClusterOptions(gpus=0, mlflow_secret="")

class Outputs(NamedTuple):
    """What a run hands back: the reports, the gate's decision and verdict."""

    validation: dsl.Markdown
    cleaning: dsl.Markdown
    augmentation: dsl.Markdown
    training: dsl.Markdown
    evaluation: dsl.HTML
    gate: dsl.Artifact
    success_rate: float
    promoted: bool

# The tasks of the pipeline (component names as Kubeflow shows them).
STAGES = ("dataset-source", "base-model", "validate", "clean", "augment", "encode", "train", "shard-names",
          "evaluate", "merge", "register", "deploy")


def _cluster(task: dsl.PipelineTask, options: ClusterOptions, gpu: bool = False) -> dsl.PipelineTask:
    if options.mlflow_secret:
        kubernetes.use_secret_as_env(task, secret_name=options.mlflow_secret, secret_key_to_env=MLFLOW_SECRET_KEYS,
                                     optional=True)
    if gpu and options.gpus:
        task.set_accelerator_type(options.accelerator).set_accelerator_limit(options.gpus)
        kubernetes.add_toleration(task, key=options.accelerator, operator="Exists", effect="NoSchedule")
    if gpu and options.volume:
        kubernetes.mount_pvc(task, pvc_name=options.volume, mount_path=options.volume_mount)
    return task


def build_pipeline(options: ClusterOptions = ClusterOptions()):
    device = "cuda" if options.gpus else "cpu"

    @dsl.pipeline(name=PIPELINE_NAME, description="LingBot-VA from data to deployment: data stages, post-training, "
                                                  "sharded closed-loop evaluation, MLflow registry, KServe")
    def vaops_pipeline(
        preset: str = "tiny",  # model preset and train recipe: tiny | robotwin | libero
        dvc_repo: str = "",  # git+DVC repository of the dataset; empty: record sim demos
        dvc_path: str = "data/demos",
        dvc_rev: str = "",  # a commit keeps the cache honest; a branch name is resolved at run time
        demo_task: str = "",  # sim task(s), comma-separated; empty: the preset's demos (tiny: transfer cube)
        demo_episodes: int = 4,  # per task
        demo_time_scale: float = 0.0,  # 0: the preset's demos (0.6 of ACT's 8 s plan; small: 0.6125)
        demo_workers: int = 0,  # rollout processes; 0: the preset's demos
        robot: str = "aloha",  # action adapter of encode: aloha | robotwin
        clean_preset: str = "aloha",
        augment_copies: int = -1,  # augmented copies per episode; negative: the augment preset's (1; strong: 2)
        augment_preset: str = "default",  # default | photometric (small: colour only) | strong
        base_checkpoint: str = "",  # folder or models:/name@alias; empty: tiny random weights
        train_config: dict = {},  # noqa: B006 (a literal default for the spec) TrainConfig fields over the recipe
        # Train's run folders, one per dataset, base and config: a rerun resumes there. Empty: beside the
        # step's output, new every run (vaops run: <root>/train-runs; compiled with --volume: on it)
        train_work_root: str = options.train_work_root,
        eval_preset: str = "smoke",
        eval_episodes: int = 1,  # per task and setting
        eval_max_steps: int = 48,
        eval_shards: int = 2,
        model_name: str = "lingbot-va",
        gate_metric: str = "success_rate",
        threshold: float = 0.5,
        tracking_uri: str = "",  # empty: the steps' MLFLOW_TRACKING_URI (or ./mlflow.db)
        device: str = device,  # torch device of encode and of the policy server in evaluate
        serving_image: str = GPU_IMAGE,
        serving_gpus: int = 1,
        serving_namespace: str = "default",  # of the InferenceService
    ) -> Outputs:
        source = dataset_source(dvc_repo=dvc_repo, dvc_path=dvc_path, dvc_rev=dvc_rev, task=demo_task,
                                episodes=demo_episodes, time_scale=demo_time_scale, preset=preset,
                                workers=demo_workers)
        base = _cluster(base_model(base_checkpoint=base_checkpoint, preset=preset, tracking_uri=tracking_uri,
                                   calibration_data=source.outputs["dataset"]), options)
        checked = validate(dataset=source.outputs["dataset"])
        cleaned = clean(dataset=source.outputs["dataset"], validation_report=checked.outputs["report"],
                        preset=clean_preset)
        augmented = augment(dataset=cleaned.outputs["cleaned"], copies=augment_copies, preset=augment_preset)
        encoded = _cluster(encode(dataset=augmented.outputs["augmented"], base_checkpoint=base.outputs["model"],
                                  preset=preset, robot=robot, device=device), options, gpu=True)
        trained = _cluster(train(latent_dataset=encoded.outputs["encoded"], base_checkpoint=base.outputs["model"],
                                 recipe=preset, config=train_config, tracking_uri=tracking_uri,
                                 work_root=train_work_root), options, gpu=True)
        train_run = trained.outputs["Output"]

        shards = shard_names(count=eval_shards)
        with dsl.ParallelFor(shards.output) as shard:
            # No task output parameters into the loop: kfp.local replaces them with the loop item.
            # Each shard links to the training run through the checkpoint's metadata instead.
            evaluated = _cluster(evaluate(checkpoint=trained.outputs["checkpoint"], preset=eval_preset,
                                          episodes=eval_episodes, max_steps=eval_max_steps, shard=shard,
                                          device=device, tracking_uri=tracking_uri), options, gpu=True)
        merged = _cluster(merge(shards=dsl.Collected(evaluated.outputs["results"]), model_run_id=train_run,
                                tracking_uri=tracking_uri), options)
        registered = _cluster(register(checkpoint=trained.outputs["checkpoint"], evaluation=merged.outputs["results"],
                                       training_data=source.outputs["dataset"], model_name=model_name,
                                       metric=gate_metric, threshold=threshold, train_run_id=train_run,
                                       tracking_uri=tracking_uri), options)
        # kfp compiles `==` on a task output into the condition; a bare truth test would not
        with dsl.If(registered.outputs["Output"] == True, name="promoted"):  # noqa: E712
            _cluster(deploy(model_uri=f"models:/{model_name}@champion", image=serving_image, gpus=serving_gpus,
                            namespace=serving_namespace, tracking_uri=tracking_uri), options)
        return Outputs(validation=checked.outputs["summary"], cleaning=cleaned.outputs["summary"],
                       augmentation=augmented.outputs["summary"], training=trained.outputs["report"],
                       evaluation=merged.outputs["report"], gate=registered.outputs["decision"],
                       success_rate=merged.outputs["Output"], promoted=registered.outputs["Output"])

    return vaops_pipeline


def compile_pipeline(output: str | Path, options: ClusterOptions = ClusterOptions()) -> Path:
    """Write the pipeline YAML (a temp file renamed into place)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.tmp.yaml")  # the compiler insists on .yaml
    compiler.Compiler().compile(build_pipeline(options), str(tmp))
    tmp.replace(output)
    return output


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster", "Kubernetes settings of the compiled pipeline")
    add_config_arguments(group, ClusterOptions, {"default": ClusterOptions()}, preset_flag=None)


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    return config_from_args(ClusterOptions, {}, args, base=ClusterOptions())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["compile"], help="compile: write the pipeline YAML")
    parser.add_argument("--output", type=Path, default=Path("pipeline.yaml"), help="YAML file to write")
    add_cluster_arguments(parser)


def main(args: argparse.Namespace) -> int:
    path = compile_pipeline(args.output, cluster_options(args))
    print(f"wrote {path} (pipeline {PIPELINE_NAME!r}: {', '.join(STAGES)})")
    return 0
