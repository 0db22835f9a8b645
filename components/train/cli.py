"""`vaops train`: post-training with DeepSpeed ZeRO, tracked in MLflow.

One process:       vaops train --dataset D --output O [--recipe tiny] [--zero-stage 3 ...]
Several GPUs:      deepspeed --num_gpus 8 --no_local_rank --module vaops.pipelines.cli train ...
                   torchrun --nproc-per-node 8 --no-python vaops train ...
Several nodes:     vaops train ... --emit-k8s job.yaml --nodes 4 --gpus-per-node 8 --k8s-volume data:/data
                   writes a Kubeflow Trainer TrainJob running this same command under torchrun.
Every TrainConfig field is a flag (`--micro-batch 2`, `--chunk-range 1,4`, `--init-from none`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os

from vaops.components.images import GPU_IMAGE
from vaops.components.stage_cli import add_config_arguments, config_arguments, config_from_args

from .config import RECIPES, TrainConfig, get_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML/JSON file of TrainConfig fields (on top of the recipe)")
    fields = parser.add_argument_group("train config (override the recipe and --config)")
    add_config_arguments(fields, TrainConfig, RECIPES, preset_flag="--recipe", default="tiny")
    k8s = parser.add_argument_group("Kubeflow Trainer (write a TrainJob instead of training)")
    k8s.add_argument("--emit-k8s", metavar="PATH", help="write the TrainJob manifest (YAML) here and exit")
    k8s.add_argument("--nodes", type=int, default=1)
    k8s.add_argument("--gpus-per-node", type=int, default=8)
    k8s.add_argument("--k8s-name", default="vaops-train")
    k8s.add_argument("--k8s-namespace")
    k8s.add_argument("--k8s-image", default=GPU_IMAGE)
    k8s.add_argument("--k8s-volume", action="append", default=[], metavar="CLAIM:/PATH",
                     help="mount a PersistentVolumeClaim in every node (repeatable)")
    k8s.add_argument("--k8s-env", action="append", default=[], metavar="KEY=VALUE")
    k8s.add_argument("--k8s-cpu")
    k8s.add_argument("--k8s-memory")


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    base = get_recipe(args.recipe)
    if args.config:
        base = TrainConfig.from_file(args.config, base=base)
    flags = {name: value for name in ("zero_stage", "compile_blocks") if (value := getattr(args, name)) is not None}
    return config_from_args(TrainConfig, RECIPES, args, preset_flag="--recipe", base=base.under(flags))


def train_arguments(cfg: TrainConfig, recipe: str) -> list[str]:
    """Command-line arguments that reproduce `cfg`: the recipe plus every field that differs from it."""
    return ["--recipe", recipe, *config_arguments(cfg, get_recipe(recipe))]


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = resolve_config(args)
    if args.emit_k8s:
        from .k8s import K8sSpec, train_job, write_manifest

        spec = K8sSpec(name=args.k8s_name, namespace=args.k8s_namespace, image=args.k8s_image, nodes=args.nodes,
                       gpus_per_node=args.gpus_per_node, volumes=tuple(args.k8s_volume), env=tuple(args.k8s_env),
                       cpu=args.k8s_cpu, memory=args.k8s_memory)
        path = write_manifest(args.emit_k8s, train_job(spec, train_arguments(cfg, args.recipe)))
        print(f"wrote TrainJob {spec.name!r} ({spec.nodes} node(s) x {spec.gpus_per_node} GPU(s)) to {path}")
        return 0
    if not cfg.dataset or not cfg.output:
        raise SystemExit("vaops train: --dataset and --output are required")
    from .trainer import run

    outputs = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(dataclasses.asdict(outputs), indent=2))
    if "RANK" in os.environ:  # a launcher's rank, about to exit
        # Its process group's threads are stopped here, not by the interpreter's teardown: a rank of the CPU
        # two-rank test once aborted at exit after a finished run ("terminate called without an active
        # exception", SIGABRT), and PyTorch asks for this before a process that joined a group exits.
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
