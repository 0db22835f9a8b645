"""Helpers of the serving tests: a live `vaops serve` subprocess on free loopback ports, the
reference (openpi) websocket client's wire behaviour, and the same episodes run on the Policy directly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import websockets.sync.client

from vaops.models.msgpack_numpy import packb, unpackb

MODEL = "lingbot-va"
TOKEN = "test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, cwd: Path, log: Path, *extra: str, token: str | None = None,
                 env: dict | None = None, command: str = "serve"):
        """`vaops serve` (or `vaops deploy --local`) for `model` on two free loopback ports."""
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.ws_url = f"ws://127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log = log
        full_env = {**os.environ, "VAOPS_MODEL_CACHE": str(cwd / "model-cache"), **(env or {})}
        full_env.pop("VAOPS_SERVE_TOKEN", None)
        if token:
            full_env["VAOPS_SERVE_TOKEN"] = token
        cmd = [sys.executable, "-m", "vaops.pipelines.cli", command, "--model", model, "--name", MODEL,
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *extra]
        if command == "deploy":
            cmd.append("--local")
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # at once: SIGTERM lets the episodes under way finish first
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


class UpstreamClient:
    """What openpi's `WebsocketClientPolicy` (the reference RoboTwin client) does on the wire."""

    def __init__(self, uri: str, api_key: str | None = None):
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self.ws = websockets.sync.client.connect(uri, compression=None, max_size=None, additional_headers=headers)
        self.metadata = unpackb(self.ws.recv())

    def infer(self, obs: dict) -> dict:
        self.ws.send(packb(obs))
        response = self.ws.recv()
        if isinstance(response, str):
            raise RuntimeError(f"Error in inference server:\n{response}")
        return unpackb(response)

    def close(self) -> None:
        self.ws.close()


def episode_images(seed: int, count: int, key: str = "observation.images.top", hw=(64, 96)) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{key: rng.integers(0, 256, (*hw, 3), dtype=np.uint8)} for _ in range(count)]




def keyframe_count(chunk: int, frames_per_latent: int = 4, frame_chunk_size: int = 2) -> int:
    """Keyframes the RoboTwin client sends after chunk `chunk` (it skips the initial latent frame)."""
    return (frame_chunk_size - (1 if chunk == 0 else 0)) * frames_per_latent


def episode_script(seed: int, chunks: int) -> tuple[dict, list[list[dict]]]:
    """The first observation and, per chunk, the keyframes a deterministic fake robot returns."""
    frames = episode_images(seed, 1 + sum(keyframe_count(k) for k in range(chunks)))
    first, rest, keyframes = frames[0], frames[1:], []
    for k in range(chunks):
        n = keyframe_count(k)
        keyframes.append(rest[:n])
        rest = rest[n:]
    return first, keyframes


def direct_episode(weights, prompt: str, seed: int, chunks: int, script_seed: int,
                   async_execution: bool = False, operating_point: str | None = None) -> list[np.ndarray]:
    """The actions of each chunk when the Policy is called in-process, no server; with
    `async_execution` in the server's order: each next chunk computed ahead before the observe.

    One torch thread, as the test servers use: on a busy 2-core machine OpenMP's spinning
    barriers make 2 threads many times slower than one."""
    first, keyframes = episode_script(script_seed, chunks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        policy = weights.new_policy()
        policy.reset(prompt, seed=seed, operating_point=operating_point)
        out = []
        chunk = policy.act(first)
        for k in range(chunks):
            ahead = policy.act_ahead() if async_execution and k + 1 < chunks else None
            policy.observe(keyframes[k], chunk.actions)
            out.append(chunk.actions)
            if k + 1 < chunks:
                chunk = ahead if async_execution else policy.act()
    finally:
        torch.set_num_threads(threads)
    return out


def websocket_episode(client: UpstreamClient, prompt: str, seed: int, chunks: int, script_seed: int,
                      async_execution: bool = False, operating_point: str | None = None) -> list[np.ndarray]:
    """The same episode through the upstream protocol, as the RoboTwin client sends it."""
    first, keyframes = episode_script(script_seed, chunks)
    reset = {"reset": True, "prompt": prompt, "seed": seed}
    if async_execution:
        reset["async_execution"] = True
    if operating_point is not None:
        reset["operating_point"] = operating_point
    assert client.infer(reset) == {}
    obs = {**first, "observation.state": np.zeros(14), "task": prompt}
    out = []
    for k in range(chunks):
        actions = client.infer({"obs": obs, "prompt": prompt})["action"]
        frames = [{**f, "observation.state": np.zeros(14), "task": prompt} for f in keyframes[k]]
        assert client.infer({"obs": frames, "compute_kv_cache": True, "imagine": False, "state": actions}) == {}
        out.append(actions)
    return out
