"""A server whose device runs out of memory while it starts (the weights, the first sessions) ends with one line
naming the device, the stage and what to change, exit 2, not torch's traceback."""

from __future__ import annotations

import pytest
import torch

from vaops.models.policy import PolicyWeights
from vaops.pipelines.cli import main as vaops
from vaops.serving import server


def _cuda_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.00 GiB. GPU 0 has a total capacity of "
                                 "79.10 GiB of which 3.12 GiB is free.\nlong advice on PYTORCH_CUDA_ALLOC_CONF")


def test_out_of_memory_making_the_first_session_is_one_line_and_exit_2(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(PolicyWeights, "new_policy", _cuda_oom)
    # it fails before it binds a port
    assert vaops(["serve", "--model", str(tiny_checkpoint), "--http-port", "18761", "--no-grpc"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    err = err.splitlines()[-1]  # after the server's own INFO lines (loading ...)
    assert err.startswith("vaops serve: error: cpu: out of memory while making the sessions ready")
    assert "Tried to allocate 7.00 GiB" in err and "PYTORCH_CUDA_ALLOC_CONF" not in err  # torch's first line only
    # the flags that take less memory at this stage, for this configuration (float32, no FP8, on a CPU)
    assert err.endswith("; serve with --fp8 --dtype bfloat16, or free memory on the device (other processes may hold "
                        "it) or serve on a larger one")


def test_out_of_memory_loading_the_weights_names_that_stage(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(server, "load_weights", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: you tried to "
                     "allocate 44000000000 bytes.")))
    with pytest.raises(ValueError, match=r"^cpu: out of memory while loading the weights \(.*can't allocate memory"
                                         r".*\); serve with --dtype bfloat16, or free memory"):
        server.build_model(server.ServeConfig(model=str(tiny_checkpoint)))
    with pytest.raises(ValueError, match=r"loading the weights .*\); free memory on the device"):  # nothing to change
        server.build_model(server.ServeConfig(model=str(tiny_checkpoint), dtype="bfloat16"))


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(server, "load_weights", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$"):
        server.build_model(server.ServeConfig(model=str(tiny_checkpoint)))
