"""Positions, masks and attention kernels.

Five backends compute the same function:
- `sdpa`: PyTorch scaled_dot_product_attention with a dense boolean mask (CPU and GPU);
- `cudnn`: the same call preferring cuDNN's Hopper kernels on a GPU, PyTorch's flash kernel for fewer
  than 128 queries without a mask;
- `splitkv` (the served GPU default): `cudnn`, except that fewer than 128 bf16 or fp16 queries over keys
  with at most a key-validity mask run models/split_kv.py's Triton kernel (H200, per layer: an action
  step 41 -> 38 us, the observation's masked action read 210 -> 72 us; bench/results/split_kv_h200.md);
- `flex`: flex_attention with a block mask (the GPU training path, where the teacher-forced mask is
  mostly empty);
- `flash`: flash-attn, from the `gpu` extra (no mask, for inference over the KV cache).
The kernel is picked at run time, so the released `attn_mode` config field needs no edit.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Backend = Literal["sdpa", "cudnn", "splitkv", "flex", "flash"]
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
        # Per device, copied once: a copy from pageable host memory waits for the device's queue, which
        # stalled the host 47 ms at each chunk's first action pass on a GPU, and the GPU then waited for it
        # (0.7 ms a chunk at the paper's operating point on an H200: bench/results/pass_timeline_h200.md).
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __call__(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """grid [..., 3, L] -> (cos, sin), each [..., L, head_dim/2] fp32."""
        bases = self._on.get(grid.device)
        if bases is None:
            bases = self._on[grid.device] = tuple(b.to(grid.device) for b in self.bases)
        angles = torch.cat(
            [grid[..., i, :].double().unsqueeze(-1) * b for i, b in enumerate(bases)],
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
    """Per-token ids of one teacher-forced sample: block index, noisy/clean flag and, with forward
    dynamics, the flag of the forward-dynamics (FD) action tokens."""

    block: torch.Tensor  # [L] int
    clean: torch.Tensor  # [L] bool
    fd: torch.Tensor | None = None  # [L] bool; None: the sequence has no FD segment


def teacher_forced_layout(video_frames: int, tokens_per_video_frame: int, action_frames: int,
                          tokens_per_action_frame: int, chunk_size: int,
                          forward_dynamics: bool = False) -> TokenLayout:
    """Tokens in the order [noisy video | clean video | noisy actions | clean actions], then with
    `forward_dynamics` [| FD actions]: a copy of the clean actions, in their chunk's video block (2t:
    they read the history that chunk's video reads; `forward_dynamics_allowed`)."""
    vf = torch.arange(video_frames).repeat_interleave(tokens_per_video_frame)
    af = torch.arange(action_frames).repeat_interleave(tokens_per_action_frame)
    vb, ab = 2 * (vf // chunk_size), 2 * (af // chunk_size) + 1
    # (blocks, clean, FD) per segment
    segments = [(vb, False, False), (vb, True, False), (ab, False, False), (ab, True, False)]
    segments += [(ab - 1, True, True)] if forward_dynamics else []

    def flag(i: int) -> torch.Tensor:
        return torch.cat([torch.full_like(seg[0], seg[i], dtype=torch.bool) for seg in segments])

    return TokenLayout(torch.cat([seg[0] for seg in segments]), flag(1), flag(2) if forward_dynamics else None)


def _causal(bq: torch.Tensor, bk: torch.Tensor, cq: torch.Tensor, ck: torch.Tensor) -> torch.Tensor:
    """Clean tokens see clean blocks up to their own, noisy tokens the clean blocks before theirs
    and their own noisy block."""
    return (cq & ck & (bk <= bq)) | (~cq & ck & (bk < bq)) | (~cq & ~ck & (bk == bq))


def teacher_forced_allowed(layout: TokenLayout, window: int | torch.Tensor):
    """Mask predicate (q_idx, kv_idx) -> bool, usable densely and as a flex mask_mod."""
    block, clean = layout.block, layout.clean

    def allowed(q, k):
        bq, bk = block[q], block[k]
        return _causal(bq, bk, clean[q], clean[k]) & ((bq - bk).abs() <= window)

    return allowed


def forward_dynamics_queries(layout: TokenLayout, chosen: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the noisy video tokens of the chunks chosen for forward dynamics (`chosen`
    [B, chunks] bool), the only tokens that see FD action tokens."""
    noisy_video = ~layout.clean & (layout.block % 2 == 0)
    return chosen[:, layout.block // 2] & noisy_video


def forward_dynamics_allowed(layout: TokenLayout, window: int | torch.Tensor, sees_fd: torch.Tensor):
    """Mask predicate (b, q_idx, kv_idx) -> bool over a layout with FD action tokens; `sees_fd` is
    `forward_dynamics_queries`. The engine's grounded pass (InferenceEngine._reimagine_executing)
    writes chunk t's executed actions at t=0 after the history before chunk t, then denoises chunk
    t's video from both, both reading the same cached history. So the FD tokens of chunk t (in its
    video block 2t) see the clean blocks before it within the window, as its noisy video does, and
    their own chunk's FD tokens; never chunk t's clean video, which chunk t's clean actions see
    (hence a copy of them). A chosen chunk's noisy video also sees its chunk's FD tokens. Nothing
    else sees them, and among the other tokens the mask is `teacher_forced_allowed`'s."""
    block, clean, fd = layout.block, layout.clean, layout.fd
    assert fd is not None, "a layout with forward_dynamics"

    def allowed(b, q, k):
        bq, bk, fq, fk = block[q], block[k], fd[q], fd[k]
        others = ~fq & ~fk & _causal(bq, bk, clean[q], clean[k])
        history = fq & ~fk & clean[k] & (bk < bq)
        own_chunk = fk & (fq | sees_fd[b, q]) & (bk == bq)
        return (others | history | own_chunk) & ((bq - bk).abs() <= window)

    return allowed


def _dense_indices(n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n, device=device).view(-1, 1), torch.arange(n, device=device).view(1, -1)


@functools.lru_cache(maxsize=32)
def teacher_forced_mask(video_frames: int, tokens_per_video_frame: int, action_frames: int,
                        tokens_per_action_frame: int, chunk_size: int, window: int,
                        device: str = "cpu") -> torch.Tensor:
    """Dense boolean mask [L, L] (True = may attend), built once per shape."""
    layout = teacher_forced_layout(video_frames, tokens_per_video_frame, action_frames,
                                   tokens_per_action_frame, chunk_size)
    return teacher_forced_allowed(layout, window)(*_dense_indices(layout.block.numel())).to(device)


_Sizes = tuple[int, int, int, int, int]  # teacher_forced_layout's sizes


def _layout_on(device: str, shape: _Sizes, forward_dynamics: bool = False) -> TokenLayout:
    layout = teacher_forced_layout(*shape, forward_dynamics=forward_dynamics)
    return TokenLayout(*(None if t is None else t.to(device) for t in (layout.block, layout.clean, layout.fd)))


def _forward_dynamics_predicate(shape: _Sizes, window: int | torch.Tensor,
                                chosen: torch.Tensor, device: str):
    """(forward_dynamics_allowed on `device`, token count) for a teacher_forced_layout `shape`."""
    layout = _layout_on(device, shape, forward_dynamics=True)
    sees_fd = forward_dynamics_queries(layout, chosen.to(device))
    return forward_dynamics_allowed(layout, window, sees_fd), layout.block.numel()


def forward_dynamics_mask(video_frames: int, tokens_per_video_frame: int, action_frames: int,
                          tokens_per_action_frame: int, chunk_size: int, window: int,
                          chosen: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """Dense boolean mask [B, 1, L, L] of the sequence with FD action tokens; `chosen` [B, chunks]
    bool, the chunks whose noisy video sees them. Built per step: it depends on the batch's draw."""
    allowed, n = _forward_dynamics_predicate((video_frames, tokens_per_video_frame, action_frames,
                                              tokens_per_action_frame, chunk_size), window, chosen, device)
    batch = torch.arange(chosen.shape[0], device=device).view(-1, 1, 1)
    return allowed(batch, *_dense_indices(n, device)).unsqueeze(1)


@functools.lru_cache(maxsize=32)
def teacher_forced_block_mask(video_frames: int, tokens_per_video_frame: int, action_frames: int,
                              tokens_per_action_frame: int, chunk_size: int, window: int,
                              device: str):
    """The same mask as a flex-attention BlockMask (skips the empty tiles on GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    layout = _layout_on(device, (video_frames, tokens_per_video_frame, action_frames, tokens_per_action_frame,
                                 chunk_size))
    # The window as a tensor, like the layout: flex attention compiles a mask_mod's Python numbers
    # into its kernel, so training (chunk 1-4 x window 4-64 drawn per step: 244 masks) recompiled at
    # almost every step and fell back to the unfused path past the recompile limit (7 s a step on
    # 2 H200 against 0.75 s). Tensors are the kernel's inputs: one compile per token count.
    allowed = teacher_forced_allowed(layout, torch.tensor(window, device=device))
    n = layout.block.numel()
    return create_block_mask(lambda b, h, q, k: allowed(q, k), None, None, n, n, device=device)


def forward_dynamics_block_mask(video_frames: int, tokens_per_video_frame: int, action_frames: int,
                                tokens_per_action_frame: int, chunk_size: int, window: int,
                                chosen: torch.Tensor, device: str):
    """`forward_dynamics_mask` as a BlockMask, one per sample (B = batch: the chosen chunks differ
    per sample). The draw enters as a [B, L] tensor, not as numbers (see teacher_forced_block_mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    allowed, n = _forward_dynamics_predicate((video_frames, tokens_per_video_frame, action_frames,
                                              tokens_per_action_frame, chunk_size),
                                             torch.tensor(window, device=device), chosen, device)
    return create_block_mask(lambda b, h, q, k: allowed(b, q, k), chosen.shape[0], None, n, n, device=device)


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


@functools.cache
def _split_kv_kernel(device: torch.device):
    """models/split_kv.py's kernel where Triton is installed (PyTorch's CUDA wheels bring it) and the GPU is
    one it compiles the kernel for (compute capability 8.0+, bf16 tensor cores); otherwise None, and
    `splitkv` reads as `cudnn` does."""
    try:
        from .split_kv import split_kv_attention  # imports triton
    except ImportError as e:
        warnings.warn(f"attention backend 'splitkv': {e}; few-query reads use PyTorch's kernels", stacklevel=3)
        return None
    return split_kv_attention if torch.cuda.get_device_capability(device) >= (8, 0) else None


def _key_flags(mask, keys: int) -> bool:
    """No mask, or one flag a key (the KV cache's live slots, [1, 1, 1, keys]): what split-KV takes."""
    return mask is None or (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.numel() == keys
                            and mask.shape[-1] == keys)


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
    elif (backend == "splitkv" and q.is_cuda and q.element_size() == 2 and q.shape[1] < CUDNN_MIN_QUERIES
          and _key_flags(mask, k.shape[1])  # fp32 keeps PyTorch's exact path
          and (split_kv := _split_kv_kernel(q.device)) is not None):
        return split_kv(q, k, v, None if mask is None else mask.reshape(-1))
    elif backend in ("cudnn", "splitkv") and q.is_cuda:
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

    def destination(self, layer: int) -> None:
        return None

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        assert k is not None and v is not None, "a masked self-attention takes its keys with the call"
        return attention(q, k, v, self.mask, self.backend)
