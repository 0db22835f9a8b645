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
"""

from __future__ import annotations

import torch
import torch.nn as nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 values, fp32 scales [M, 1]) with x ~ values * scales."""
    scale = x.detach().abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


class FP8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        weight, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)  # [out, in]
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.register_buffer("one", torch.ones((), device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=self.one, scale_b=self.one, out_dtype=torch.bfloat16)
        out = out.float() * (x_scale * self.weight_scale)
        if self.bias is not None:
            out = out + self.bias
        return out.to(torch.bfloat16).view(*x.shape[:-1], self.out_features)


def quantize_blocks_fp8(model: nn.Module) -> int:
    """Swap every Linear inside `model.blocks` for an FP8Linear; returns how many were swapped."""
    swapped = 0
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, FP8Linear(child))
                    swapped += 1
    return swapped
