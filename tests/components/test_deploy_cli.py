"""`vaops deploy --local` passes on only the serve flags that differ from its defaults: they must be `vaops serve`'s."""

import argparse

from vaops.components.deploy.cli import LocalServe, add_arguments, serve_command
from vaops.components.deploy.deploy import DeployConfig
from vaops.models.codec import config_from_args
from vaops.serving import cli as serve_cli
from vaops.serving.config import ServeConfig


def test_local_defaults_are_vaops_serves():
    d, s = LocalServe(), ServeConfig()
    assert (d.http_port, d.grpc_port, d.device) == (s.http_port, s.grpc_port, s.device)


def test_serve_command_reaches_vaops_serve(monkeypatch):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "models:/va/1", "--local", "--http-port", "9000", "--device", "cuda",
                              "--idle-timeout", "5", "--dtype", "float32", "--max-sessions", "2"])
    config = config_from_args(DeployConfig, {}, args, base=DeployConfig(model=args.model))
    cmd = serve_command(config, config_from_args(LocalServe, {}, args, base=LocalServe()), "va")
    assert cmd[3] == "serve"
    serve_parser = argparse.ArgumentParser()
    serve_cli.add_arguments(serve_parser)
    monkeypatch.delenv("VAOPS_SERVE_TOKEN", raising=False)
    got = serve_cli.serve_config(serve_parser.parse_args(cmd[4:]))
    assert got == ServeConfig(model="models:/va/1", name="va", http_port=9000, device="cuda", idle_timeout_s=5.0,
                              dtype="float32", max_sessions=2)
