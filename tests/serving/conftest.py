"""Fixtures of the serving tests: a tiny checkpoint, its weights in-process, one live server."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving_support import ServerProcess


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from vaops.models.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_weights(tiny_checkpoint):
    from vaops.models.checkpoint import load_weights

    return load_weights(tiny_checkpoint)


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory):
    """One server without a token on the tiny checkpoint, shared by the tests of group "serve"; two episode
    operations in flight, as a GPU server runs several (serving/config.py GPU_COMPUTE_THREADS), so the
    concurrent-episode tests cross sessions' operations for real."""
    work = tmp_path_factory.mktemp("serve")
    proc = ServerProcess(str(tiny_checkpoint), work, work / "server.log", "--max-sessions", "10",
                         "--torch-threads", "1", "--compute-threads", "2").wait_ready()
    yield proc
    proc.stop()
