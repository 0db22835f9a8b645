"""`vaops deploy`: the KServe InferenceService manifest for a registered model version, or with
`--local`, the same model served on this machine (loopback) by `vaops serve`."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, replace

from vaops.models.codec import add_config_arguments, config_arguments, config_from_args
from vaops.models.model_source import TOKEN_ENV, parse_model_uri

from .deploy import DeployConfig, run, service_name
from .manifest import serving_options


@dataclass(frozen=True)
class LocalServe:
    """`--local`: `vaops serve`'s flags of the same names, passed on where they differ from these defaults
    (`vaops serve`'s own: tests/components/test_deploy_cli.py)."""

    local: bool = field(default=False, metadata={"help": "start the policy server on this machine"})
    http_port: int = 8080
    grpc_port: int = 8081
    device: str = "cpu"
    idle_timeout: float | None = field(default=None, metadata={"help": "seconds (default: vaops serve's)"})
    max_request_mb: float | None = field(default=None, metadata={"help": "default: vaops serve's"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every DeployConfig field (its manifest's too: `--gpus 2`) is a flag; LocalServe's in the group `local`."""
    parser.add_argument("--model", required=True, help="models:/<name>@<alias> or models:/<name>/<version>")
    add_config_arguments(parser, DeployConfig, {"default": DeployConfig(model="")}, preset_flag=None)
    local = parser.add_argument_group("local", f"serve here (loopback; token from ${TOKEN_ENV}) instead of writing "
                                               "a manifest")
    add_config_arguments(local, LocalServe, {"default": LocalServe()}, preset_flag=None)


def serve_command(config: DeployConfig, local: LocalServe, name: str) -> list[str]:
    """`vaops serve` for `--local`. A command, not a call: components do not import the serving layer."""
    return [sys.executable, "-m", "vaops.pipelines.cli", "serve", "--model", config.model, "--name", name,
            # float32 on CPU: bfloat16 matmuls there are slow and gain nothing
            "--dtype", "float32" if local.device == "cpu" else config.manifest.dtype,
            "--max-sessions", str(config.manifest.max_sessions), *serving_options(config.manifest),
            *config_arguments(replace(local, local=False), LocalServe())]


def main(args: argparse.Namespace) -> int:
    config = config_from_args(DeployConfig, {}, args, base=DeployConfig(model=args.model))
    local = config_from_args(LocalServe, {}, args, base=LocalServe())
    if local.local:
        # The same process id becomes the server ($VAOPS_SERVE_TOKEN passes through the environment).
        cmd = serve_command(config, local, config.manifest.name or service_name(parse_model_uri(args.model)[0]))
        os.execv(cmd[0], cmd)
    result = run(config)
    print(f"wrote {result.manifest} for version {result.version} (checkpoint {result.storage_uri})")
    for warning in result.warnings:
        print(f"warning: {warning}")
    return 0
