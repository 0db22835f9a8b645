"""The `vaops` command line: one subcommand per stage, each defined next to its code.

Every entry of COMMANDS names a module exposing `add_arguments(parser)` and `main(args) -> int`;
modules are imported only when their command runs, so `vaops --help` stays fast and a
missing optional extra only affects the command that needs it. A command that ends in a
ValueError or FileNotFoundError (bad input) ends with one line naming it and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("vaops.pipelines.generate", "first frame(s) + prompt -> imagined video (mp4) and actions (npz)"),
    "demos": ("vaops.components.demos.cli", "scripted-expert demonstrations from the MuJoCo ALOHA sim as a LeRobot dataset"),
    "ingest": ("vaops.components.ingest.cli", "any LeRobot dataset (v2.1, v3.0, or a DVC path at a revision) -> a normalised dataset"),
    "validate": ("vaops.components.validate.cli", "check a dataset: videos, frame counts, timestamps, values, widths, segments -> report"),
    "clean": ("vaops.components.clean.cli", "drop or repair episodes by documented rules -> cleaned dataset + report"),
    "augment": ("vaops.components.augment.cli", "clip-consistent visual augmentation, instruction paraphrases, action noise"),
    "encode": ("vaops.components.encode.cli", "VAE latents, text embeddings and norm stats per segment, in the released layout"),
    "register": ("vaops.components.register.cli", "log a checkpoint as an MLflow model version with lineage; gate the champion alias"),
    "train": ("vaops.components.train.cli", "post-training with DeepSpeed ZeRO (one process, deepspeed/torchrun, or a Kubeflow TrainJob), tracked in MLflow"),
    "eval": ("vaops.components.evaluate.cli", "closed-loop evaluation through a policy server: ALOHA sim or RoboTwin 2.0, sharded, report + MLflow"),
    "serve": ("vaops.serving.cli", "policy server: KServe REST/gRPC and the upstream websocket protocol"),
    "deploy": ("vaops.components.deploy.cli", "KServe InferenceService manifest for a registered model, or --local to serve it"),
    "pipeline": ("vaops.pipelines.pipeline", "compile the Kubeflow pipeline (data to deployment) to YAML"),
    "run": ("vaops.pipelines.run", "run the pipeline locally with kfp.local (cached, resumable), or --host URL on Kubeflow"),
    "demo": ("vaops.pipelines.demo", "the whole pipeline on embedded defaults: DVC data registry, sim demos, MLflow, KServe"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaops", description="LingBot-VA from data to deployment")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are attached lazily in main() for the chosen command only.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"vaops {name}", description=help_text)
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    try:
        return int(module.main(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # bad input (a DatasetError is a ValueError) that a command did not answer itself: one line, exit 2
        print(f"vaops {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
