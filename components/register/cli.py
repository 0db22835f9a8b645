"""`vaops register`: log a checkpoint as an MLflow model version with lineage and gate the champion alias."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vaops.models.codec import add_config_arguments, config_from_args

from .registry import RegisterConfig, run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every RegisterConfig field is a flag (`--threshold 0.6`), the checkpoint an argument."""
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder (transformer/, vae/, ..., policy.json)")
    add_config_arguments(parser, RegisterConfig, {"default": RegisterConfig(checkpoint=Path("."))}, preset_flag=None)


def main(args: argparse.Namespace) -> int:
    result = run(config_from_args(RegisterConfig, {}, args, base=RegisterConfig(checkpoint=args.checkpoint)))
    print(json.dumps({"model_uri": result.model_uri, "run_id": result.run_id, **result.decision.to_dict()}, indent=2))
    print(f"gate: {result.decision.reason}", file=sys.stderr)  # stdout stays JSON
    return 0
