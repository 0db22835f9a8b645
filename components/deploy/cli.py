"""`vaops deploy`: the KServe InferenceService manifest for a registered model version, or with
`--local`, the same model served on this machine (loopback) by `vaops serve`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vaops.models.model_source import parse_model_uri

from .deploy import DeployConfig, run, service_name
from .manifest import ManifestSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ManifestSpec(name="", storage_uri="", model_uri="")
    parser.add_argument("--model", required=True, help="models:/<name>@<alias> or models:/<name>/<version>")
    parser.add_argument("--output", type=Path, default=DeployConfig(model="").output, help="manifest to write")
    parser.add_argument("--storage-uri", help="where the cluster fetches the checkpoint (default: the registry's "
                                              "artifact location of that version)")
    parser.add_argument("--name", help="InferenceService name (default: the registered model name)")
    parser.add_argument("--namespace", default=d.namespace)
    parser.add_argument("--image", default=d.image, help="serving image (docker/ builds it)")
    parser.add_argument("--gpus", type=int, default=d.gpus)
    parser.add_argument("--cpu", default=d.cpu)
    parser.add_argument("--memory", default=d.memory)
    parser.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"])
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions)
    parser.add_argument("--token-secret", help="Kubernetes Secret (key 'token') that enables bearer authentication")
    local = parser.add_argument_group("local", "serve here (loopback; token from $VAOPS_SERVE_TOKEN) instead of "
                                               "writing a manifest")
    local.add_argument("--local", action="store_true", help="start the policy server on this machine")
    local.add_argument("--http-port", type=int, default=8080)
    local.add_argument("--grpc-port", type=int, default=8081)
    local.add_argument("--device", default="cpu")
    local.add_argument("--idle-timeout", type=float, help="seconds (default: vaops serve's)")
    local.add_argument("--max-request-mb", type=float, help="default: vaops serve's")


def serve_command(args: argparse.Namespace, name: str) -> list[str]:
    """`vaops serve` for `--local`. A command, not a call: components do not import the serving layer."""
    cmd = [sys.executable, "-m", "vaops.pipelines.cli", "serve", "--model", args.model, "--name", name,
           "--http-port", str(args.http_port), "--grpc-port", str(args.grpc_port), "--device", args.device,
           # float32 on CPU: bfloat16 matmuls there are slow and gain nothing
           "--dtype", "float32" if args.device == "cpu" else args.dtype, "--max-sessions", str(args.max_sessions)]
    if args.idle_timeout is not None:
        cmd += ["--idle-timeout", str(args.idle_timeout)]
    if args.max_request_mb is not None:
        cmd += ["--max-request-mb", str(args.max_request_mb)]
    return cmd


def main(args: argparse.Namespace) -> int:
    name = args.name or service_name(parse_model_uri(args.model)[0])
    if args.local:
        # The same process id becomes the server ($VAOPS_SERVE_TOKEN passes through the environment).
        cmd = serve_command(args, name)
        os.execv(cmd[0], cmd)
    spec = ManifestSpec(name=name, storage_uri="", model_uri="", namespace=args.namespace, image=args.image,
                        gpus=args.gpus, cpu=args.cpu, memory=args.memory, dtype=args.dtype,
                        max_sessions=args.max_sessions, token_secret=args.token_secret)
    result = run(DeployConfig(model=args.model, output=args.output, manifest=spec, storage_uri=args.storage_uri))
    print(f"wrote {result.manifest} for version {result.version} (checkpoint {result.storage_uri})")
    for warning in result.warnings:
        print(f"warning: {warning}")
    return 0
