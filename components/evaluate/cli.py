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

from .config import PRESETS, ClientConfig, Shard, TrackingConfig, get_eval_preset

TOKEN_ENV = "VAOPS_SERVE_TOKEN"


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, help="evaluation folder (shards, videos, metrics.json, report)")
    parser.add_argument("--merge", type=Path, metavar="FOLDER",
                        help="merge the finished shards in FOLDER into metrics.json, the report and an MLflow run")
    parser.add_argument("--preset", default="aloha", choices=sorted(PRESETS),
                        help="smoke: 1 short ALOHA episode per task; aloha: 50 per task; robotwin: the paper's protocol")
    parser.add_argument("--policy-url", help=f"websocket url of a running policy server (default {ClientConfig().url})")
    parser.add_argument("--checkpoint", help="instead of --policy-url: serve this checkpoint folder (or models:/name@alias) "
                        "on this machine for the evaluation")
    parser.add_argument("--device", default="cpu", help="with --checkpoint: cpu, cuda, cuda:1, ...")
    parser.add_argument("--token-env", default=TOKEN_ENV, help="environment variable holding the server's bearer token")
    parser.add_argument("--tasks", nargs="+", help="subset of the preset's tasks")
    parser.add_argument("--settings", nargs="+", help="robotwin: clean and/or randomized")
    parser.add_argument("--episodes", type=int, help="episodes (trials) per task and setting")
    parser.add_argument("--seed", type=int, help="evaluation seed (first env seed 10000 * (1 + seed))")
    parser.add_argument("--max-steps", type=int, help="actions per episode (robotwin default: each task's own limit)")
    parser.add_argument("--fps", type=int, help="aloha: actions per second, as the demonstrations were recorded")
    parser.add_argument("--async-execution", nargs="?", const=True, default=False, choices=(True, "naive", "grounded"),
                        metavar="MODE",
                        help="the server computes each next chunk while the robot executes the current one; MODE "
                             "naive (the default) continues the executing chunk's forecast, grounded first "
                             "re-imagines it from the latest observation (the paper's)")
    parser.add_argument("--operating-point",
                        help="the server's named sampling settings for every episode (released, paper, fast; "
                             "its metadata lists them); default: the model's own")
    parser.add_argument("--real-time", action="store_true",
                        help="aloha: every action takes 1/fps s of wall time, as on a robot (pair with --async-execution)")
    parser.add_argument("--robotwin-root", type=Path, help="path of a RoboTwin 2.0 checkout (suite robotwin)")
    parser.add_argument("--shard", type=_shard, default=Shard(), help="run worker i of n (i/n), e.g. 0/4")
    parser.add_argument("--no-videos", action="store_true", help="no per-episode videos (and no imagined video)")
    parser.add_argument("--no-imagine", action="store_true", help="videos without the model's imagined video")
    parser.add_argument("--request-timeout", type=float, default=ClientConfig().request_timeout_s,
                        help="seconds to wait for one reply before failing the episode")
    parser.add_argument("--connect-attempts", type=int, default=ClientConfig().connect_attempts)
    parser.add_argument("--model-run-id", help="MLflow run that trained the model; the evaluation run is tagged with it")
    parser.add_argument("--experiment", default=TrackingConfig().experiment, help="MLflow experiment")
    parser.add_argument("--tracking-uri", help="MLflow store (default MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def _tracking(args) -> TrackingConfig:
    return TrackingConfig(enabled=not args.no_mlflow, tracking_uri=args.tracking_uri, experiment=args.experiment,
                          model_run_id=args.model_run_id)


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
        if args.merge:
            result = merge_and_report(args.merge, _tracking(args))
        else:
            if args.output is None:
                raise ValueError("--output is required (or --merge FOLDER)")
            if args.checkpoint and args.policy_url:
                raise ValueError("give --policy-url (a running server) or --checkpoint (serve one here), not both")
            client = ClientConfig(url=args.policy_url or ClientConfig().url, request_timeout_s=args.request_timeout,
                                  connect_attempts=args.connect_attempts, token=os.environ.get(args.token_env) or None)
            config = get_eval_preset(
                args.preset, args.output, client=client, tasks=tuple(args.tasks) if args.tasks else None,
                settings=tuple(args.settings) if args.settings else None, episodes=args.episodes, seed=args.seed,
                max_steps=args.max_steps, fps=args.fps, async_execution=args.async_execution,
                operating_point=args.operating_point, real_time=args.real_time, robotwin_root=args.robotwin_root, shard=args.shard,
                videos=not args.no_videos, imagine=not args.no_imagine, tracking=_tracking(args))
            if args.checkpoint:
                from .local_server import LocalPolicyServer

                with LocalPolicyServer(args.checkpoint, config.shard_dir() / "policy_server.log", args.device) as server:
                    result = run(config.replace(client=dataclasses.replace(client, url=server.url)))
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
