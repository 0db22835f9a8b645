"""`vaops eval`: closed-loop evaluation through a policy server (upstream websocket protocol).

    vaops eval --preset smoke --policy-url ws://127.0.0.1:8080 --output runs/eval
    vaops eval --preset smoke --checkpoint checkpoints/tiny --output runs/eval   # serves it here
    vaops eval --preset robotwin --robotwin-root ~/RoboTwin --policy-url ws://gpu0:8080 \\
               --output runs/rt --shard 0/8          # one worker per GPU server, then:
    vaops eval --merge runs/rt                        # metrics.json, report, MLflow run
    vaops eval --preset smoke --checkpoint ck --output runs/async --real-time --async-execution
                                                      # the control loop's idle time, computing ahead
    vaops eval ... --async-execution grounded         # the paper's grounded variant
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from vaops.components.stage_cli import add_config_arguments, config_from_args
from vaops.models.model_source import TOKEN_ENV

from .config import PRESETS, EvalConfig, checked


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every EvalConfig field is a flag (its client's and tracking's too: `--policy-url`, `--no-mlflow`);
    presets: smoke (1 short ALOHA episode per task), aloha (50 per task), robotwin (the paper's protocol), ..."""
    parser.add_argument("--merge", type=Path, metavar="FOLDER",
                        help="merge the finished shards in FOLDER into metrics.json, the report and an MLflow run")
    parser.add_argument("--checkpoint", help="instead of --policy-url: serve this checkpoint folder (or models:/name@alias) "
                        "on this machine for the evaluation")
    parser.add_argument("--device", default="cpu", help="with --checkpoint: cpu, cuda, cuda:1, ...")
    parser.add_argument("--token-env", default=TOKEN_ENV, help="environment variable holding the server's bearer token")
    add_config_arguments(parser, EvalConfig, PRESETS, default="aloha")


def _print_summary(result) -> None:
    if result.metrics is None:
        print(f"shard done: {len(result.records)} episode(s) in {result.output_dir}; merge all shards with "
              f"`vaops eval --merge {result.output_dir}`")
        return
    m = result.metrics
    for setting, s in m["settings"].items():
        print(f"{setting}: success {100 * s['success_rate']:.1f}% over {s['episodes']} episode(s), "
              f"{s['errors']} ended in error")
    idle = m["latency"]["idle"]
    if idle["count"]:
        print(f"control loop: idle {idle['p50_s']:.3f} s per chunk (median; p95 {idle['p95_s']:.3f} s), "
              f"{100 * m['control_loop']['idle_fraction']:.1f}% of the time")
    print(f"report: {result.report['html']}")
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MUJOCO_GL", "egl")
    from .client import PolicyConnectionError
    from .run import EvaluationAborted, merge_and_report, run

    try:
        config = config_from_args(EvalConfig, PRESETS, args)
        if args.merge:
            result = merge_and_report(args.merge, config.tracking)
        else:
            if args.checkpoint and args.policy_url:
                raise ValueError("give --policy-url (a running server) or --checkpoint (serve one here), not both")
            token = os.environ.get(args.token_env) or None
            config = checked(config.replace(client=dataclasses.replace(config.client, token=token)))
            if args.checkpoint:
                from .local_server import LocalPolicyServer

                with LocalPolicyServer(args.checkpoint, config.shard_dir() / "policy_server.log", args.device) as server:
                    result = run(config.replace(client=dataclasses.replace(config.client, url=server.url)))
            else:
                result = run(config)
    except EvaluationAborted as e:
        print(f"vaops eval: {e}", file=sys.stderr)
        return 1
    except PolicyConnectionError as e:  # checked before the first episode: nothing ran
        hint = "" if args.checkpoint else "; start one (`vaops serve`) or give --checkpoint to serve one here"
        print(f"vaops eval: error: {' '.join(str(e).split())}{hint}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"vaops eval: error: {e}", file=sys.stderr)
        return 2
    _print_summary(result)
    return 0
