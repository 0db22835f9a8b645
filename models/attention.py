"""Positions, masks and attention kernels.

Four kernels compute the same function: `sdpa` (PyTorch scaled_dot_product_attention with a
dense boolean mask; CPU and GPU), `cudnn` (the same call preferring cuDNN's Hopper kernels on
GPU), `flex` (flex_attention with a block mask; the GPU training path, where the teacher-forced
mask is mostly empty) and `flash` (flash-attn, from the `gpu` extra; no mask, for inference over
the KV cache). The kernel is picked at run time, so the released
`attn_mode` config field needs no edit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Backend = Literal["sdpa", "cudnn", "flex", "flash"]
_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
_FLASH_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
# A block of fewer queries (the 32 action tokens of a denoising step) over a long unmasked cache
# leaves most of the GPU idle in cuDNN's kernel, which runs one block per 128 queries; the flash
# kernel splits the keys across the GPU by itself (H200, 32 queries over 9,792 keys: 56 us against
# 139 us). The flash kernel takes no mask, so masked reads stay on cuDNN.
CUDNN_MIN_QUERIES = 128


def grid_ids(frames: int, height: int, width: int, frame_offset: float = 0.0,
             action: bool = False, device: torch.device | str | None = None) -> torch.Tensor:
    """Rotary grid ids [3, frames*height*width] in (f, h, w) token order.

    Video token: (frame + offset, row, col). Action j of N in a frame (height=N, width=1):
    (frame + offset + (j+1)/(N+1), -1, -1), i.e. between its frame and the next.
    """
    f = torch.arange(frames, device=device, dtype=torch.float32) + frame_offset
    h = torch.arange(height, device=device, dtype=torch.float32)
    w = torch.arange(width, device=device, dtype=torch.float32)
    ff, hh, ww = torch.meshgrid(f, h, w, indexing="ij")
    if action:
        ff = ff + (torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + 1)).view(1, -1, 1)
        hh = torch.full_like(hh, -1.0)
        ww = torch.full_like(ww, -1.0)
    return torch.stack([ff, hh, ww]).flatten(1)


class RotaryEmbedding:
    """3D rotary embedding: the head dim split f: d-2*(d//3), h: d//3, w: d//3, theta 10000."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        f_dim = head_dim - 2 * (head_dim // 3)
        hw_dim = head_dim // 3

        def base(dim: int) -> torch.Tensor:
            return 1.0 / (theta ** (torch.arange(0, dim, 2, device="cpu")[: dim // 2].double() / dim))

        self.bases = (base(f_dim), base(hw_dim), base(hw_dim))

    def __call__(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """grid [..., 3, L] -> (cos, sin), each [..., L, head_dim/2] fp32."""
        angles = torch.cat(
            [grid[..., i, :].double().unsqueeze(-1) * b.to(grid.device) for i, b in enumerate(self.bases)],
            dim=-1,
        ).float()
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0,x1),(x2,x3)... x: [B, L, H, D]; cos/sin: [(B,) L, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.flatten(-2).to(x.dtype)


@dataclass(frozen=True)
class TokenLayout:
    """Per-token ids of one teacher-forced sample: block index and noisy/clean flag."""

    block: torch.Tensor  # [L] int
    clean: torch.Tensor  # [L] bool


def teacher_forced_layout(video_frames: int, tokens_per_video_frame: int, action_frames: int,
                          tokens_per_action_frame: int, chunk_size: int) -> TokenLayout:
    """Tokens in the order [noisy video | clean video | noisy actions | clean actions]."""
    vf = torch.arange(video_frames).repeat_interleave(tokens_per_video_frame)
    af = torch.arange(action_frames).repeat_interleave(tokens_per_action_frame)
    vb, ab = 2 * (vf // chunk_size), 2 * (af // chunk_size) + 1
    block = torch.cat([vb, vb, ab, ab])
    clean = torch.cat([torch.zeros_like(vb), torch.ones_like(vb), torch.zeros_like(ab), torch.ones_like(ab)]).bool()
    return TokenLayout(block, clean)


def teacher_forced_allowed(layout: TokenLayout, window: int | torch.Tensor):
    """Mask predicate (q_idx, kv_idx) -> bool, usable densely and as a flex mask_mod."""
    block, clean = layout.block, layout.clean

    def allowed(q, k):
        bq, bk, cq, ck = block[q], block[k], clean[q], clean[k]
        causal = (cq & ck & (bk <= bq)) | (~cq & ck & (bk < bq)) | (~cq & ~ck & (bk == bq))
        return causal & ((bq - bk).abs() <= window)

    return allowed


@functools.lru_cache(maxsize=32)
def teacher_forced_mask(video_frames: int, tokens_per_video_frame: int, action_frames: int,
                        tokens_per_action_frame: int, chunk_size: int, window: int,
                        device: str = "cpu") -> torch.Tensor:
    """Dense boolean mask [L, L] (True = may attend), built once per shape."""
    layout = teacher_forced_layout(video_frames, tokens_per_video_frame, action_frames,
                                   tokens_per_action_frame, chunk_size)
    n = layout.block.numel()
    q = torch.arange(n).view(-1, 1)
    k = torch.arange(n).view(1, -1)
    return teacher_forced_allowed(layout, window)(q, k).to(device)


@functools.lru_cache(maxsize=32)
def teacher_forced_block_mask(video_frames: int, tokens_per_video_frame: int, action_frames: int,
                              tokens_per_action_frame: int, chunk_size: int, window: int,
                              device: str):
    """The same mask as a flex-attention BlockMask (skips the empty tiles on GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    layout = teacher_forced_layout(video_frames, tokens_per_video_frame, action_frames,
                                   tokens_per_action_frame, chunk_size)
    layout = TokenLayout(layout.block.to(device), layout.clean.to(device))
    # The window as a tensor, like the layout: flex attention compiles a mask_mod's Python numbers
    # into its kernel, so training (chunk 1-4 x window 4-64 drawn per step: 244 masks) recompiled at
    # almost every step and fell back to the unfused path past the recompile limit (7 s a step on
    # 2 H200 against 0.75 s). Tensors are the kernel's inputs: one compile per token count.
    allowed = teacher_forced_allowed(layout, torch.tensor(window, device=device))
    n = layout.block.numel()
    return create_block_mask(lambda b, h, q, k: allowed(q, k), None, None, n, n, device=device)


_flex_attention = None


def _flex():
    global _flex_attention
    if _flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex_attention = torch.compile(flex_attention, dynamic=False)
    return _flex_attention


def _flash_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise ImportError("attention backend 'flash' needs flash-attn: pip install 'vaops[gpu]'") from e
    return flash_attn_func


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None,
              backend: str = "sdpa") -> torch.Tensor:
    """q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]; backend: one of `Backend` (a str: it comes
    from policy.json and the CLI through the engine and the transformer).

    mask: None, a boolean tensor broadcastable to [B, H, Lq, Lk] (sdpa), or a BlockMask (flex).
    """
    if backend == "flash":
        if mask is not None:
            raise ValueError("the flash backend takes no mask; compact the keys first")
        return _flash_func()(q, k, v)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if backend == "flex":
        out = _flex()(qt, kt, vt, block_mask=mask)
    elif backend == "cudnn" and q.is_cuda:
        short = mask is None and q.shape[1] < CUDNN_MIN_QUERIES
        with sdpa_kernel(_FLASH_FIRST if short else _CUDNN_FIRST, set_priority=True):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


@dataclass(frozen=True)
class MaskedSelfAttention:
    """Self-attention over the same token set with a fixed mask (the teacher-forced sequence)."""

    mask: object = None
    backend: str = "sdpa"  # one of Backend

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, self.mask, self.backend)
