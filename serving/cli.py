"""`vaops serve`: the policy server for a checkpoint folder or a registered model version."""

from __future__ import annotations

import argparse
import os

from .config import TOKEN_ENV, ServeConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServeConfig(model="")
    parser.add_argument("--model", required=True,
                        help="checkpoint folder, or models:/<name>@<alias> | models:/<name>/<version> from the registry")
    parser.add_argument("--name", default=d.name, help="model name on the /v2/models/<name> endpoints")
    parser.add_argument("--host", default=d.host,
                        help="interface to bind (default loopback only; 0.0.0.0 inside a container)")
    parser.add_argument("--http-port", type=int, default=d.http_port, help="REST, websocket and metrics port")
    parser.add_argument("--grpc-port", type=int, default=d.grpc_port)
    parser.add_argument("--no-grpc", action="store_true", help="serve REST and websocket only")
    parser.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"])
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions)
    parser.add_argument("--max-cache-gb", type=float, default=d.max_cache_gb,
                        help="memory budget for all sessions' KV caches (further bounds --max-sessions)")
    parser.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s,
                        help="seconds after which an idle session is closed")
    parser.add_argument("--max-request-mb", type=float, default=d.max_request_mb)
    parser.add_argument("--compute-threads", type=int, default=d.compute_threads,
                        help="episode operations computed at once (1 suits one GPU)")
    parser.add_argument("--max-batch", type=int, default=d.max_batch,
                        help="most robots whose chunks run as one batch (default %(default)s: each alone)")
    parser.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                        help="how long a chunk waits for other robots' chunks to batch with (default: %(default)s)")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--no-warmup", action="store_true",
                        help="report ready at once, without running an episode's shapes first (GPU only)")
    parser.add_argument("--token-env", default=TOKEN_ENV,
                        help="environment variable holding the bearer token (unset: no authentication)")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        model=args.model, name=args.name, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
        enable_grpc=not args.no_grpc, device=args.device, dtype=args.dtype, max_sessions=args.max_sessions,
        max_cache_gb=args.max_cache_gb, idle_timeout_s=args.idle_timeout, token=os.environ.get(args.token_env) or None,
        max_request_mb=args.max_request_mb, compute_threads=args.compute_threads, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms, torch_threads=args.torch_threads,
        warmup=not args.no_warmup,
    ).validate()


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .server import serve

    serve(config_from_args(args))
    return 0
