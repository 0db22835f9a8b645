"""A policy server on this machine for the length of an evaluation: `vaops serve` in a child
process on a free loopback port, stopped afterwards (`vaops eval --checkpoint`, the Kubeflow
component, the tests).

    with LocalPolicyServer(checkpoint, log) as server:
        run(config.replace(client=ClientConfig(url=server.url)))

The process starts when the object is made and `with` waits until it is ready, so several
servers can start at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def claim_port(port: int) -> int:
    """`port` if nothing listens on it, else one line saying so."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise RuntimeError(f"port {port} is taken (another `vaops serve`, or an earlier `vaops demo "
                               f"--keep-serving`?); stop it first") from None
    return port


class LocalPolicyServer:
    def __init__(self, model: str | os.PathLike, log: Path, device: str = "cpu", torch_threads: int | None = None,
                 startup_timeout_s: float = 300.0, port: int | None = None, serve_args: Sequence[str] = ()):
        """Start serving `model` (a checkpoint folder or models:/name@alias) on `port` (None: a free one);
        `serve_args`: more `vaops serve` flags (e.g. --dtype bfloat16 --fp8)."""
        self.port = free_port() if port is None else claim_port(port)
        self.url = f"ws://127.0.0.1:{self.port}"
        self.log = Path(log)
        self.startup_timeout_s = startup_timeout_s
        cmd = [sys.executable, "-m", "vaops.pipelines.cli", "serve", "--model", str(model),
               "--http-port", str(self.port), "--no-grpc", "--device", device]
        if torch_threads:
            cmd += ["--torch-threads", str(torch_threads)]
        cmd += list(serve_args)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, HF_HUB_OFFLINE="1"))

    def wait_ready(self) -> "LocalPolicyServer":
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the policy server exited with code {self.proc.returncode}; its log {self.log} "
                                   f"ends:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the policy server was not ready after {self.startup_timeout_s:g} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # at once: SIGTERM lets the episodes under way finish first
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()

    def __enter__(self) -> "LocalPolicyServer":
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
