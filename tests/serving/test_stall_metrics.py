"""The counters of work that stalls every served robot (serving/metrics.py): CUDA graphs captured (reported by
models/cuda_graphs.py's capture hooks) and functions compiled. bench/serve_load.py reports their increase over each
real-time row, so they must move with the work."""

import torch
from prometheus_client import REGISTRY

import vaops.serving.metrics  # noqa: F401  (registers the gauges)
from vaops.models.cuda_graphs import CAPTURE_HOOKS


def sample(name: str) -> float:
    value = REGISTRY.get_sample_value(name)
    assert value is not None, f"{name} is not exported"
    return value


def test_compiled_frames_count_each_compilation():
    before = sample("vaops_compiled_frames")
    f = torch.compile(lambda x: x * 2 + 1, backend="eager")  # dynamo's frame count, without inductor's C++ build
    f(torch.ones(3))
    f(torch.ones(3))  # the same shape: no new compilation
    assert sample("vaops_compiled_frames") == before + 1
    f(torch.ones(2, 3))  # a new rank: recompiled
    assert sample("vaops_compiled_frames") == before + 2


def test_graph_capture_counters_count_each_capture_reported():
    count, seconds = sample("vaops_cuda_graph_captures_total"), sample("vaops_cuda_graph_capture_seconds_total")
    if not torch.cuda.is_available():
        assert count == 0  # nothing is captured on a CPU
        for hook in list(CAPTURE_HOOKS):  # what CapturedCall reports after a capture of 0.25 s
            hook("engine ('action', 1)", 0.25)
        assert sample("vaops_cuda_graph_captures_total") == count + 1
        assert sample("vaops_cuda_graph_capture_seconds_total") == seconds + 0.25
        return
    from vaops.models.cuda_graphs import CapturedCall
    seen = []
    CAPTURE_HOOKS.append(lambda label, took: seen.append((label, took)))
    try:
        call = CapturedCall(lambda x: x * 2, [torch.ones(4, device="cuda")], label="doubling")
    finally:
        CAPTURE_HOOKS.pop()
    assert [label for label, _ in seen] == ["doubling"] and seen[0][1] > 0
    assert torch.equal(call(torch.full((4,), 3.0, device="cuda")), torch.full((4,), 6.0, device="cuda"))
    assert sample("vaops_cuda_graph_captures_total") == count + 1
    assert sample("vaops_cuda_graph_capture_seconds_total") > seconds
