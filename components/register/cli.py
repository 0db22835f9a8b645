"""`vaops register`: log a checkpoint as an MLflow model version with lineage and gate the champion alias."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .registry import RegisterConfig, run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = RegisterConfig(checkpoint=Path("."))
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder (transformer/, vae/, ..., policy.json)")
    parser.add_argument("--name", default=d.name, help="registered model name")
    parser.add_argument("--metrics", type=Path, help="the evaluation's metrics.json")
    parser.add_argument("--metric", default=d.metric, help="the metric the promotion gate compares")
    parser.add_argument("--threshold", type=float, default=d.threshold,
                        help="promote only at or above this value (and at least the current champion's)")
    parser.add_argument("--train-run-id", help="MLflow run that trained it (default: from trainer_state.json)")
    parser.add_argument("--data", type=Path, help="the DVC-tracked training dataset (its .dvc file or folder)")
    parser.add_argument("--repo", type=Path, default=d.repo, help="git/DVC repository root")
    parser.add_argument("--experiment", default=d.experiment)
    parser.add_argument("--alias", default=d.alias)
    parser.add_argument("--output", type=Path, help="folder for gate_decision.json")


def main(args: argparse.Namespace) -> int:
    result = run(RegisterConfig(
        checkpoint=args.checkpoint, name=args.name, metrics=args.metrics, metric=args.metric,
        threshold=args.threshold, train_run_id=args.train_run_id, data=args.data, repo=args.repo,
        experiment=args.experiment, alias=args.alias, output=args.output))
    print(json.dumps({"model_uri": result.model_uri, "run_id": result.run_id, **result.decision.to_dict()}, indent=2))
    print(f"gate: {result.decision.reason}", file=sys.stderr)  # stdout stays JSON
    return 0
