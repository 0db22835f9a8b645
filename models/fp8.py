"""Opt-in FP8 block GEMMs (Hopper GPUs): half the bytes per weight and twice the bf16 tensor-core rate.

Each block Linear keeps its weight in float8_e4m3fn with one scale per output channel; each call scales
every input token by its own absolute maximum over 448. The product runs in `torch._scaled_mm` with
unit scales, and the token and channel scales (and the bias) are applied to its bf16 result.

Why the scales are applied outside the GEMM: on an H200 (torch 2.11, bench/results/pass_anatomy_h200.md)
`_scaled_mm` given row-wise scales runs CUTLASS kernels that are slower than bf16 at the action passes'
32 tokens (FFN down 36.7 us against 28.5 us), while given scalar scales it runs cuBLASLt's (13.1 us).
Inside the compiled block regions (models/transformer.py) the token scales' reduction and the scaling of
the result fuse into the kernels around the GEMM, so per-token and per-channel accuracy costs no extra
kernel (one scale per whole tensor needs a grid-wide reduction: two more kernels per GEMM). It changes
the numbers: bench/chunk_latency.py measures how far from the fp32 path, beside the bf16 path.

Each block's FFN becomes an FP8FeedForward: on a GPU the up projection's scaling, the tanh GELU and the
down projection's quantisation run as one Triton kernel (models/fp8_gelu.py), not as inductor's fusion of
them, which read each row twice (bench/results/chunk_latency_served_h200.md).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


# cuBLASLt's fast FP8 accumulation (no periodic promotion to fp32). H200, same process
# (bench/results/chunk_latency_chain_h200.json): 0.528 -> 0.519 s a chunk at the released settings, 0.106 ->
# 0.104 s at the paper's point, with the same distance from fp32 (actions rel L2 0.0057 -> 0.0059).
FAST_ACCUM = True


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 values, fp32 scales [M, 1]) with x ~ values * scales."""
    scale = x.detach().abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., H, D] -> FP8 e4m3 values and one float32 scale per [..., H] (the absolute maximum of each
    key's head maps to 448, e4m3's largest): the keys and values models/split_kv.py takes in FP8."""
    scale = x.float().abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale.unsqueeze(-1)).to(FP8), scale


class FP8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # [out, in]
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.register_buffer("one", torch.ones((), device=weight.device))

    def unit_product(self, xq: torch.Tensor) -> torch.Tensor:
        """FP8 rows [M, in] times the FP8 weight, unit scales: [M, out] bf16. For the action passes' 32-64 rows
        a Triton kernel (weight channels as the tile's rows, split-K) measured no faster than cuBLASLt's
        with the weights read from DRAM (bench/results/pass_anatomy_skinny_h200.json)."""
        return torch._scaled_mm(xq, self.weight.t(), scale_a=self.one, scale_b=self.one, out_dtype=torch.bfloat16,
                                use_fast_accum=FAST_ACCUM)

    def epilogue(self, product: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """The token and channel scales and the bias, applied to `unit_product`'s result."""
        out = product.float() * (x_scale * self.weight_scale)
        if self.bias is not None:
            out = out + self.bias
        return out.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        return self.epilogue(self.unit_product(xq), x_scale).view(*x.shape[:-1], self.out_features)


# The FFN's middle as models/fp8_gelu.py's kernel on a GPU: on an H200, 16.5 against inductor's 26.9 us for
# a video pass's 480 rows, 5.7 against 7.6 us for an action step's 32 (pass_anatomy_ffn_h200.json).
FUSED_GELU = True


@functools.cache
def _fused_gelu_op():
    """models/fp8_gelu.py's operator where Triton is installed, else None (the eager formula). An import
    statement, not importlib: dynamo traces this inside the compiled regions."""
    try:
        from .fp8_gelu import gelu_quantize_rows
    except ImportError as e:
        warnings.warn(f"FP8 FFN: {e}; its GELU and quantisation run as inductor fuses them", stacklevel=3)
        return None
    return gelu_quantize_rows


class FP8FeedForward(nn.Module):
    """A diffusers FeedForward with tanh GELU whose two Linears are FP8Linear: between them, the up
    projection's epilogue, the GELU and the down projection's quantisation run as one kernel on a GPU
    (models/fp8_gelu.py). Same submodules and state-dict keys as the FeedForward it wraps."""

    def __init__(self, ffn: nn.Module):
        super().__init__()
        if getattr(ffn.net[0], "approximate", None) != "tanh":
            raise ValueError(f"FP8FeedForward: expects a tanh-GELU FeedForward, got {ffn.net[0]}")
        self.net = ffn.net  # [GELU(proj), Dropout, Linear]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.net[0].proj, self.net[2]
        xq, x_scale = quantize_rows(x.reshape(-1, up.in_features))
        product = up.unit_product(xq)
        if FUSED_GELU and x.is_cuda and up.bias is not None and (fused := _fused_gelu_op()) is not None:
            hq, h_scale = fused(product, x_scale, up.weight_scale, up.bias)
        else:
            hq, h_scale = quantize_rows(F.gelu(up.epilogue(product, x_scale), approximate="tanh"))
        return down.epilogue(down.unit_product(hq), h_scale).view(*x.shape[:-1], down.out_features)


def quantize_blocks_fp8(model: nn.Module) -> int:
    """Swap every Linear inside `model.blocks` for an FP8Linear (and each FFN for an FP8FeedForward);
    returns how many Linears were swapped."""
    swapped = 0
    for block in model.blocks:
        block.ffn = FP8FeedForward(block.ffn)
        for name, module in list(block.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, FP8Linear(child))
                    swapped += 1
    return swapped
