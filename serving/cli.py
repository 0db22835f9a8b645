"""`vaops serve`: the policy server for a checkpoint folder or a registered model version."""

from __future__ import annotations

import argparse
import logging
import os

from vaops.models.codec import add_config_arguments, config_from_args

from .config import TOKEN_ENV, ServeConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every ServeConfig field is a flag (`--max-batch 8`, `--no-grpc`, `--no-warmup`) but its token."""
    add_config_arguments(parser, ServeConfig, {"default": ServeConfig()}, preset_flag=None)
    parser.add_argument("--token-env", default=TOKEN_ENV,
                        help="environment variable holding the bearer token (unset: no authentication)")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    token = os.environ.get(args.token_env) or None
    return config_from_args(ServeConfig, {}, args, base=ServeConfig(token=token)).validate()


def log_like_kserve() -> None:
    """The server's own lines (its capacity, a drain) at INFO on stderr, formatted as kserve's: without a handler
    only warnings would show."""
    from kserve.logging import KSERVE_LOG_CONFIG

    fmt = KSERVE_LOG_CONFIG["formatters"]["kserve"]
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt["fmt"], fmt["datefmt"]))
    logger = logging.getLogger("vaops")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .server import serve

    cfg = serve_config(args)
    log_like_kserve()
    serve(cfg)
    return 0
