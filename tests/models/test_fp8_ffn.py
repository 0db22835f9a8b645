"""The FP8 FFN (models/fp8.py FP8FeedForward) and its fused GELU-quantise kernel (models/fp8_gelu.py), the
kernel run by Triton's interpreter on the CPU in a child process (TRITON_INTERPRET=1 is read at import)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward

from vaops.models.fp8 import FP8FeedForward, FP8Linear, quantize_blocks_fp8, quantize_rows

KERNEL = r"""
import inspect
import json
import torch
import torch.nn.functional as F
from vaops.models.fp8 import quantize_rows
from vaops.models.fp8_gelu import launch

g = torch.Generator().manual_seed(0)
m, n = 6, 300  # 300 columns: a masked tail in the 512-wide block
raw = (torch.randn(m, n, generator=g) * 3).to(torch.bfloat16)
raw[2] *= 1e-3  # a row of small values keeps its own scale
x_scale, w_scale, bias = torch.rand(m, 1, generator=g) + 0.5, torch.rand(1, n, generator=g) + 0.5, torch.randn(n, generator=g)
q, s = launch(raw, x_scale, w_scale, bias, out_dtype=torch.float32)  # before the FP8 rounding (see launch)
h = F.gelu((raw.float() * (x_scale * w_scale) + bias).to(torch.bfloat16), approximate="tanh")
rq, rs = quantize_rows(h)
ref = h.float() / rs
r = {"shapes": [list(q.shape), list(s.shape)], "scale rel": ((s - rs).abs() / rs).max().item(),
     "within 448": q.abs().max().item(),
     # what the interpreter's bf16 rounding can move a value by: a bf16 ulp of the value (2^-8 of it), more
     # for the GELU's small values (a ulp of its input), hence + 1 (in units of the FP8 range, 448)
     "worst rel": ((q - ref).abs() / (ref.abs() + 1.0)).max().item(),
     "typical rel": ((q - ref).norm() / ref.norm()).item(),
     "small row rel": ((q[2] * s[2] - h[2].float()).norm() / h[2].float().norm()).item(),
     "fp8 default": str(inspect.signature(launch).parameters["out_dtype"].default)}
try:
    launch(raw[:, :200], x_scale, w_scale, bias)
    r["mismatch"] = "accepted"
except ValueError as e:
    r["mismatch"] = str(e)
print(json.dumps(r))
"""


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", KERNEL], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fused_gelu_quantise_matches_the_eager_steps_to_the_rounding(interpreted):
    """The interpreter rounds fp32 to bf16 differently from a GPU's round-to-nearest (values one bf16 ulp
    apart), so: scales and values within a bf16 ulp or two of the eager steps', most far closer."""
    assert interpreted["shapes"] == [[6, 300], [6, 1]]
    assert interpreted["fp8 default"] == "torch.float8_e4m3fn"
    assert interpreted["scale rel"] < 2 ** -7
    assert interpreted["within 448"] <= 448.0 * (1 + 2 ** -7)
    assert interpreted["worst rel"] < 2 ** -4  # 0.03 here: a ulp of -2.59 moves GELU(-2.59) = -0.0118 by 3%
    assert interpreted["typical rel"] < 2 ** -6  # two bf16 roundings, each up to a ulp (2^-8 to 2^-7)
    assert interpreted["small row rel"] < 2 ** -7  # a row 1000x smaller keeps its own scale


def test_fused_gelu_quantise_refuses_shapes_that_do_not_fit(interpreted):
    assert "do not fit together" in interpreted["mismatch"]


def test_fp8_feed_forward_is_the_feed_forward_with_fp8_linears():
    """Swapped in by quantize_blocks_fp8: the same state-dict keys and, off the GPU, the very numbers of
    diffusers' FeedForward whose Linears are FP8Linear."""
    torch.manual_seed(0)
    ffn = FeedForward(64, inner_dim=160, activation_fn="gelu-approximate").to(torch.bfloat16)
    keys = set(ffn.state_dict())
    ffn.net[0].proj, ffn.net[2] = FP8Linear(ffn.net[0].proj), FP8Linear(ffn.net[2])
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    wrapped = FP8FeedForward(ffn)
    assert torch.equal(wrapped(x), ffn(x))
    assert {k for k in wrapped.state_dict() if not k.endswith(("weight_scale", "one"))} == keys
    h = F.gelu(ffn.net[0].proj(x), approximate="tanh")
    assert torch.equal(ffn(x), ffn.net[2](h))
    rq, rs = quantize_rows(h.reshape(-1, 160))
    assert rq.dtype == torch.float8_e4m3fn and rs.shape == (10, 1)


def test_fp8_feed_forward_refuses_other_activations():
    with pytest.raises(ValueError, match="tanh-GELU"):
        FP8FeedForward(FeedForward(64, inner_dim=160, activation_fn="gelu"))


def test_quantize_blocks_wraps_each_ffn():
    from vaops.models.config import get_preset
    from vaops.models.transformer import build_transformer

    model = build_transformer(get_preset("tiny").transformer, dtype=torch.bfloat16)
    quantize_blocks_fp8(model)
    assert all(isinstance(b.ffn, FP8FeedForward) and isinstance(b.ffn.net[2], FP8Linear) for b in model.blocks)


def test_the_ffn_kernel_lookup_traces_inside_a_compiled_region():
    """The compiled regions reach `_fused_gelu_op` on a GPU only (FP8FeedForward's CUDA branch), and dynamo
    traces into it with fullgraph=True. An importlib-based lookup broke that on the GPU (commit 1da81db), where
    no CPU test went; this compiles the lookup itself on the CPU."""
    pytest.importorskip("triton")
    from vaops.models.fp8 import _fused_gelu_op

    compiled = torch.compile(lambda x: x + (1.0 if _fused_gelu_op() is not None else 2.0), fullgraph=True,
                             backend="eager")
    assert compiled(torch.zeros(1)).item() == 1.0  # traced, and the kernel's operator found
