"""The FP8 FFN's middle in one Triton kernel (GPU inference): the up projection's epilogue, tanh GELU and
the per-token FP8 quantisation of the down projection's input.

Inductor fuses the same three steps into one reduction kernel too, but a looped one: it reads each row of
the up projection's product twice (once for the row's absolute maximum, once to quantise it), recomputing
the epilogue and the GELU, and on an H200 it took 28.5 us for a video pass's 480 x 14,336 products
(bench/results/pass_anatomy_h200.md), about 3x the time to read and write them. Here one program holds a
whole row in registers: read once, written once. A looped variant (the row in pieces of 1,024-4,096
columns, read twice, fewer registers a thread) was slower at every row count on an H200: 21.1 against 16.5
us at 480 rows, 8.1 against 5.7 at 32 (bench/results/pass_anatomy_ffn_looped_h200.json).

Numbers follow the eager path step by step (models/fp8.py): the epilogue rounds to bf16, the GELU is
computed in fp32 from that and rounded to bf16, then quantised with one scale a row; tanh is written with
exp (1 - 2 / (e^2u + 1)), which agrees with PyTorch's to a few ulp of fp32 before the bf16 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
# Globals a kernel reads must be constexpr.
FP8_MAX = tl.constexpr(448.0)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


# One program a row, the whole row in registers (BLOCK >= N): read once.
@triton.jit
def _gelu_quantize(Raw, XS, WS, Bias, Out, Scale, N, stride_raw, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    keep = cols < N
    raw = tl.load(Raw + row * stride_raw + cols, mask=keep, other=0.0).to(tl.float32)
    scale = tl.load(XS + row) * tl.load(WS + cols, mask=keep, other=0.0)
    y = (raw * scale + tl.load(Bias + cols, mask=keep, other=0.0)).to(tl.bfloat16).to(tl.float32)
    u = SQRT_2_OVER_PI * (y + 0.044715 * y * y * y)
    h = (0.5 * y * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))).to(tl.bfloat16).to(tl.float32)
    row_scale = tl.maximum(tl.max(tl.where(keep, tl.abs(h), 0.0), axis=0), 1e-12) / FP8_MAX
    tl.store(Out + row * stride_out + cols, (h / row_scale).to(Out.dtype.element_ty), mask=keep)
    tl.store(Scale + row, row_scale)


def launch(raw: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, kernel=_gelu_quantize,
           out_dtype: torch.dtype = FP8, num_warps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """raw [M, N] bf16 (the unit-scale FP8 product), x_scale [M, 1], w_scale [1, N], bias [N] fp32
    -> (FP8 [M, N], fp32 scales [M, 1]): quantize_rows(gelu_tanh(bf16(raw * x_scale * w_scale + bias))).
    out_dtype float32: the values before their rounding to FP8 (Triton's CPU interpreter rounds to FP8
    wrongly, e.g. 127.7 to 64: its tests read these)."""
    m, n = raw.shape
    if raw.stride(1) != 1 or w_scale.stride(-1) != 1 or x_scale.numel() != m or w_scale.numel() != n or bias.numel() != n:
        raise ValueError(f"gelu_quantize_rows: raw {tuple(raw.shape)} (unit column stride), x_scale {tuple(x_scale.shape)}, "
                         f"w_scale {tuple(w_scale.shape)}, bias {tuple(bias.shape)} do not fit together")
    out = torch.empty((m, n), dtype=out_dtype, device=raw.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=raw.device)
    # 14,336 columns in 16 warps: 32 values a thread per array, no spills.
    kernel[(m,)](raw, x_scale, w_scale, bias, out, scale, n, raw.stride(0), out.stride(0),
                 BLOCK=triton.next_power_of_2(n), num_warps=num_warps)
    return out, scale


@torch.library.triton_op("vaops::gelu_quantize_rows", mutates_args=())
def gelu_quantize_rows(raw: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`launch` as an operator, so the compiled block regions call the kernel in place of their own."""
    return launch(raw, x_scale, w_scale, bias, torch.library.wrap_triton(_gelu_quantize))
