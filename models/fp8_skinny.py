"""FP8 products of few tokens (Triton; GPU inference): the block Linears of the action passes.

An action step multiplies 32 tokens (64 under CFG) by every block weight, so it is bound by reading the
weights, not by the tensor cores. cuBLASLt's kernels for these shapes on an H200 read the weights at
1.7-3.0 TB/s of the 4.8 (bench/results/pass_anatomy_kvstore_h200.json, part 4: 5.7 us for a 3,072 x 3,072
FP8 weight, 9.4 MB; 14.6 us + a 2.2 us split-K reduction for the FFN's down projection, 44 MB).

Here the product is computed transposed, out^T = W x^T: the weight's output channels are the tile's 64
rows (the smallest Hopper tensor-core tile) and the tokens its columns, so no tile is padded from 32
tokens to 64. The weight's columns may be split over thread blocks (split-K) so that every SM reads its
share: each slice writes fp32 partial sums, added in the wrapper (inductor fuses the sum into the
product's consumer inside the compiled regions).

Both operands are e4m3 with unit scales and the result is rounded to bf16, as models/fp8.py's
`_scaled_mm` call gives it; the token and channel scales stay in its epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _skinny(X, W, Out, M, K, k_per_split, sxm, swn, sos, som,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    start = split * k_per_split
    end = tl.minimum(start + k_per_split, K)
    rows = offs_m[None, :] < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(start, end, BLOCK_K):
        w = tl.load(W + offs_n[:, None] * swn + (k0 + offs_k)[None, :])  # [N tile, K tile], K contiguous
        x = tl.load(X + offs_m[None, :] * sxm + (k0 + offs_k)[:, None], mask=rows, other=0.0)  # [K tile, tokens]
        acc = tl.dot(w, x, acc)
    tl.store(Out + split * sos + offs_m[None, :] * som + offs_n[:, None], acc.to(Out.dtype.element_ty), mask=rows)


@dataclass(frozen=True)
class Launch:
    block_n: int = 64
    block_k: int = 128
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 4


def default_launch(m: int, n: int, k: int, sms: int) -> Launch:
    """Weight tiles of 64 channels x 128 columns; split-K until the thread blocks cover the SMs about twice,
    each slice at least 4 tiles long."""
    tiles = (n // 64) * triton.cdiv(m, 64)
    splits = max(1, min(triton.cdiv(2 * sms, tiles), k // (4 * 128)))
    return Launch(splits=splits)


def fits(m: int, n: int, k: int, launch: Launch | None = None) -> bool:
    """Whether the kernel takes these shapes: whole weight tiles (no masks on the weight)."""
    launch = launch or Launch()
    return m >= 1 and n % launch.block_n == 0 and k % launch.block_k == 0


def skinny_launch(xq: torch.Tensor, w: torch.Tensor, launch: Launch | None = None, kernel=_skinny) -> torch.Tensor:
    """xq [M, K] and w [N, K], both float8_e4m3fn with unit column stride -> xq @ w.T in bf16 [M, N],
    accumulated in fp32. `launch`: the tiles, split-K and warps (default: `default_launch`)."""
    m, k = xq.shape
    n = w.shape[0]
    if w.shape[1] != k or xq.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"fp8 skinny product: xq {tuple(xq.shape)} and w {tuple(w.shape)} need the same K, "
                         "contiguous along it")
    if launch is None:
        sms = torch.cuda.get_device_properties(xq.device).multi_processor_count if xq.is_cuda else 132
        launch = default_launch(m, n, k, sms)
    if not fits(m, n, k, launch):
        raise ValueError(f"fp8 skinny product: N {n} and K {k} must be multiples of {launch.block_n} and "
                         f"{launch.block_k}")
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    k_per_split = triton.cdiv(triton.cdiv(k, launch.splits), launch.block_k) * launch.block_k
    splits = triton.cdiv(k, k_per_split)
    if splits == 1:
        out = torch.empty((m, n), dtype=torch.bfloat16, device=xq.device)
        sos = 0
    else:
        out = torch.empty((splits, m, n), dtype=torch.float32, device=xq.device)
        sos = out.stride(0)
    grid = (n // launch.block_n, splits, triton.cdiv(m, block_m))
    kernel[grid](xq, w, out, m, k, k_per_split, xq.stride(0), w.stride(0), sos, n,
                 BLOCK_M=block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k,
                 num_warps=launch.num_warps, num_stages=launch.num_stages)
    return out if splits == 1 else out.sum(0).to(torch.bfloat16)


@torch.library.triton_op("vaops::fp8_skinny_mm", mutates_args=())
def fp8_skinny_mm(xq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`skinny_launch` as an operator, so the compiled block regions call the kernel in place of cuBLASLt."""
    return skinny_launch(xq, w, kernel=torch.library.wrap_triton(_skinny))
