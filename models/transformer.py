"""The LingBot-VA transformer: one shared Wan-style backbone for video-latent and action tokens.

Parameter names and shapes follow the released `transformer/` folders exactly (MODEL.md,
"Checkpoint layout"), so `load_transformer` reads them by name and `save_transformer` writes the
same format back.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.normalization import FP32LayerNorm
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import write_folder_atomically
from .attention import RotaryEmbedding, apply_rotary, attention, grid_ids
from .config import TransformerConfig

# Kept in fp32 when the rest runs in bf16: they set the modulation, which is sensitive to rounding.
FP32_MODULES = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class SelfAttentionFn(Protocol):
    """How a block's self-attention finds its keys: a teacher-forced mask or a KV cache."""

    def destination(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(keys, values, slots): the block stores its new keys/values there itself (`keys[:, slots] = k`)
        and calls with k = v = None; None: they come with the call."""
        ...

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor: ...


class TextAttentionFn(Protocol):
    """How a block's cross-attention reads the prompt: one episode's (TextContext), or a batch's, each row its own
    robot's (models/batch.py)."""

    def attend(self, layer: int, q: torch.Tensor, backend: str) -> torch.Tensor: ...


class TimeTextEmbedding(nn.Module):
    def __init__(self, dim: int, freq_dim: int, text_dim: int):
        super().__init__()
        self.timesteps_proj = Timesteps(num_channels=freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(in_channels=freq_dim, time_embed_dim=dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, dim * 6)
        self.text_embedder = PixArtAlphaTextProjection(text_dim, dim, act_fn="gelu_tanh")

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timesteps [B, F] -> temb [B, F, D], modulation [B, F, 6, D]."""
        b, f = timesteps.shape
        t = self.timesteps_proj(timesteps.reshape(-1)).to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(t).to(dtype)
        mod = self.time_proj(self.act_fn(temb))
        return temb.view(b, f, -1), mod.view(b, f, 6, -1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.to_qkv: nn.Module | None = None

    def fuse_qkv_projections(self) -> None:
        """Replace to_q, to_k and to_v by one Linear (inference): one GEMM instead of three, which
        matters for the short token blocks of the denoising steps."""
        if self.to_qkv is not None:
            return
        linears = (self.to_q, self.to_k, self.to_v)
        w = linears[0].weight
        fused = nn.Linear(w.shape[1], 3 * w.shape[0], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
        del self.to_q, self.to_k, self.to_v
        self.to_qkv = fused

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q and k (after QK RMSNorm) and v, each [B, L, heads, head_dim]."""
        if self.to_qkv is not None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        heads = (self.heads, -1)
        return self.norm_q(q).unflatten(2, heads), self.norm_k(k).unflatten(2, heads), v.unflatten(2, heads)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.norm_k(self.to_k(context)).unflatten(2, (self.heads, -1))
        v = self.to_v(context).unflatten(2, (self.heads, -1))
        return k, v


@dataclass
class TextContext:
    """Cross-attention keys/values of the text, per layer; constant over an episode."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]

    def select(self, batch: slice) -> "TextContext":
        return TextContext([(k[batch], v[batch]) for k, v in self.kv])

    def attend(self, layer: int, q: torch.Tensor, backend: str) -> torch.Tensor:
        """Cross-attention of q [B, L, H, D] over this layer's text keys/values."""
        return attention(q, *self.kv[layer], backend=backend)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.eps)
        self.attn2 = Attention(dim, cfg.num_attention_heads, cfg.eps)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, inner_dim=cfg.ffn_dim, activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, layer: int, x: torch.Tensor, text: TextAttentionFn,
                mod: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                self_attention: SelfAttentionFn, backend: str, regions: "BlockRegions") -> torch.Tensor:
        """x [B, L, D]; mod [B, G, 6, D]: the modulation of G equal groups of consecutive tokens
        (one per frame at inference, one per token in the teacher-forced sequence)."""
        q, k, v = regions.attn_in(self, x, mod, *rope, self_attention.destination(layer))
        x, q = regions.attn_out(self, x, self_attention(layer, q, k, v), mod)
        cross = text.attend(layer, q, "sdpa" if backend == "flex" else backend)
        return regions.ffn_out(self, x, cross, mod)


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.unflatten(1, (groups, -1))


def _modulation(block: TransformerBlock, mod: torch.Tensor, i: int) -> torch.Tensor:
    """The i-th of the block's six modulation vectors, [B, G, 1, D] in fp32: its table plus the pass's. Made
    inside the compiled regions, where it fuses into its consumer (outside, a cast and an add a layer: 3 ms
    of a paper-point chunk on an H200)."""
    return (block.scale_shift_table[:, i] + mod[:, :, i].float()).unsqueeze(2)


def _block_attn_in(block: TransformerBlock, x, mod, cos, sin, destination=None):
    """norm1 -> modulate -> q, k (QK RMSNorm, rotary), v. With a destination (keys, values, slots), k and v
    are stored there (compiled, in the rotary's kernel) and returned as None."""
    shift, scale = _modulation(block, mod, 0), _modulation(block, mod, 1)
    g = shift.shape[1]
    h = (_grouped(block.norm1(x.float()), g) * (1 + scale) + shift).flatten(1, 2).type_as(x)
    q, k, v = block.attn1.project_qkv(h)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if destination is None:
        return q, k, v
    keys, values, slots = destination
    keys[:, slots] = k
    values[:, slots] = v
    return q, None, None


def _block_attn_out(block: TransformerBlock, x, attn, mod):
    """Gated self-attention residual, then the cross-attention query."""
    gate = _modulation(block, mod, 2)
    g = gate.shape[1]
    out = block.attn1.to_out[0](attn.flatten(2).type_as(x))
    x = (_grouped(x.float(), g) + _grouped(out, g) * gate).flatten(1, 2).type_as(x)
    h = block.norm2(x.float()).type_as(x)
    a = block.attn2
    return x, a.norm_q(a.to_q(h)).unflatten(2, (a.heads, -1))


def _block_ffn_out(block: TransformerBlock, x, cross, mod):
    """Cross-attention residual, norm3 -> modulate -> FFN -> gated residual."""
    c_shift, c_scale, c_gate = (_modulation(block, mod, i) for i in (3, 4, 5))
    g = c_shift.shape[1]
    x = x + block.attn2.to_out[0](cross.flatten(2).type_as(x))
    h = (_grouped(block.norm3(x.float()), g) * (1 + c_scale) + c_shift).flatten(1, 2).type_as(x)
    return (_grouped(x.float(), g) + _grouped(block.ffn(h).float(), g) * c_gate).flatten(1, 2).type_as(x)


def _block_ffn_out_attn_in(block: TransformerBlock, next_block: TransformerBlock, x, cross, mod, cos, sin,
                           destination=None):
    """A block's ffn_out and the next block's attn_in as one region: nothing runs between them, and the
    residual's sum fuses into the next norm (one kernel a layer fewer: 2.3 us each, 480 a paper chunk)."""
    x = _block_ffn_out(block, x, cross, mod)
    return (x, *_block_attn_in(next_block, x, mod, cos, sin, destination))


# Inference runs the blocks as a chain of regions from one attention call to the next (see `trunk`).
CHAIN_REGIONS = True

# Rows up to this many elements are reduced in one pass over registers (inductor's persistent reduction),
# not in a loop that reads the row again for each statistic: inductor's own limit is 1,024, and the blocks'
# norms and FP8 row scales reduce rows of 3,072. 0: inductor's choice.
WHOLE_ROWS = 4096
WHOLE_ROW_CALLS = [0]  # how often the heuristic chose a whole row (benchmarks check that it ran)


@functools.cache
def _whole_row_choices():
    """An inductor heuristics handler that reduces rows of up to WHOLE_ROWS elements in one pass."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class WholeRows(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, *args, **kwargs):
            if (WHOLE_ROWS and features.get_reduction_hint() == ReductionHint.INNER
                    and V.graph.sizevars.statically_known_leq(features.reduction_numel, WHOLE_ROWS)):
                WHOLE_ROW_CALLS[0] += 1
                return True
            return InductorChoices.should_use_persistent_reduction(features, *args, **kwargs)

    return WholeRows()


def _compile_region(fn: Callable) -> Callable:
    """torch.compile of a block region. At inference its kernels are generated under `_whole_row_choices` (a
    handler inductor reads per thread: set around each call, so it holds in whichever thread compiles);
    training's forward and backward kernels stay inductor's own, as its throughput was measured with them."""
    from torch._inductor.virtualized import V

    compiled = torch.compile(fn, dynamic=False, fullgraph=True)

    @functools.wraps(fn)
    def run(*args):
        if torch.is_grad_enabled():
            return compiled(*args)
        with V.set_choices_handler(_whole_row_choices()):
            return compiled(*args)

    return run


@dataclass(frozen=True)
class BlockRegions:
    """The parts of a block between its attention calls; compiled as a whole when asked for, so
    the norms, modulation, rotary and gates fuse into a few kernels (attention stays outside)."""

    attn_in: Callable = _block_attn_in
    attn_out: Callable = _block_attn_out
    ffn_out: Callable = _block_ffn_out
    ffn_out_attn_in: Callable = _block_ffn_out_attn_in

    @classmethod
    @functools.cache
    def compiled(cls) -> "BlockRegions":
        c = _compile_region
        return cls(c(_block_attn_in), c(_block_attn_out), c(_block_ffn_out), c(_block_ffn_out_attn_in))


class LingBotVATransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.inner_dim
        self.rope = RotaryEmbedding(cfg.attention_head_dim)
        self.patch_embedding_mlp = nn.Linear(cfg.in_channels * math.prod(cfg.patch_size), dim)
        self.action_embedder = nn.Linear(cfg.action_dim, dim)
        self.condition_embedder = TimeTextEmbedding(dim, cfg.freq_dim, cfg.text_dim)
        # The action embedder's own text projection exists in the checkpoints but is never used.
        self.condition_embedder_action = TimeTextEmbedding(dim, cfg.freq_dim, cfg.text_dim)
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.action_proj_out = nn.Linear(dim, cfg.action_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.gradient_checkpointing = False
        # With gradient checkpointing, recompute every n-th block only (2: half of them, for
        # micro-batches whose activations fit half-checkpointed; training's checkpoint_every).
        self.checkpoint_every = 1
        self.regions = BlockRegions()

    # ----- dtype -----
    def to_dtype(self, dtype: torch.dtype) -> "LingBotVATransformer":
        """Cast to `dtype`, keeping the modulation path in fp32 as the released models do."""
        self.to(dtype)
        for name, module in self.named_modules():
            if name.split(".")[-1] in FP32_MODULES:
                module.float()
        for name, p in self.named_parameters():
            if name.split(".")[-1] == "scale_shift_table":
                p.data = p.data.float()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding_mlp.weight.dtype

    # ----- tokens -----
    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> [B, F*h*w, C*pf*ph*pw] in (f, h, w) order, patch vector (c, pf, ph, pw)."""
        pf, ph, pw = self.config.patch_size
        b, c, f, h, w = latents.shape
        x = latents.view(b, c, f // pf, pf, h // ph, ph, w // pw, pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (f // pf) * (h // ph) * (w // pw), -1)

    def unpatchify(self, tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """proj_out tokens [B, L, (pf ph pw c)] -> [B, C, F, H, W]."""
        pf, ph, pw = self.config.patch_size
        b = tokens.shape[0]
        f, h, w = frames // pf, height // ph, width // pw
        x = tokens.view(b, f, h, w, pf, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, -1, frames, height, width)

    def embed_video(self, latents: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding_mlp(self.patchify(latents.to(self.dtype)))

    def embed_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """[B, A, F, N, 1] -> [B, F*N, D], one token per action step."""
        return self.action_embedder(actions.to(self.dtype).flatten(2).transpose(1, 2))

    def video_tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (height // ph) * (width // pw)

    def time_embed(self, timesteps: torch.Tensor, action: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame timesteps [B, F] -> per-frame temb [B, F, D] and modulation [B, F, 6, D]."""
        embedder = self.condition_embedder_action if action else self.condition_embedder
        return embedder(timesteps, self.dtype)

    def text_context(self, text_emb: torch.Tensor) -> TextContext:
        """Project the text once; every block's cross-attention keys/values."""
        text = self.condition_embedder.text_embedder(text_emb.to(self.dtype))
        return TextContext([blk.attn2.project_kv(text) for blk in self.blocks])

    # ----- the shared trunk -----
    def fuse_qkv_projections(self) -> None:
        """One self-attention input GEMM per block (inference; the state dict changes)."""
        for block in self.blocks:
            block.attn1.fuse_qkv_projections()

    def compile_blocks(self) -> None:
        """Run the blocks' attention-free parts through torch.compile (GPU inference)."""
        # One graph per token shape (video/action chunks, with and without the CFG batch), per
        # weight format: more than dynamo's default of 8 recompilations per function.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.regions = BlockRegions.compiled()

    def trunk(self, x: torch.Tensor, temb: torch.Tensor, mod: torch.Tensor,
              rope: tuple[torch.Tensor, torch.Tensor], text: TextAttentionFn,
              self_attention: SelfAttentionFn, backend: str = "sdpa") -> torch.Tensor:
        """x [B, L, D]; temb [B, G, D] and mod [B, G, 6, D] per group of L/G consecutive tokens."""
        if CHAIN_REGIONS and not torch.is_grad_enabled():
            x = self._chain(x, mod, rope, text, self_attention, backend)
        else:  # training: block by block, the unit of activation checkpointing and of its memory tables
            for i, block in enumerate(self.blocks):
                args = (i, x, text, mod, rope, self_attention, backend, self.regions)
                if self.gradient_checkpointing and torch.is_grad_enabled() and i % self.checkpoint_every == 0:
                    x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
                else:
                    x = block(*args)
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).unsqueeze(2).unbind(3)
        out = _grouped(self.norm_out(x.float()), temb.shape[1]) * (1 + scale) + shift
        return out.flatten(1, 2).type_as(x)

    def _chain(self, x: torch.Tensor, mod: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               text: TextAttentionFn, self_attention: SelfAttentionFn, backend: str) -> torch.Tensor:
        """The blocks' forward (TransformerBlock.forward, the same operations in the same order) with the
        regions cut at the attention calls only: block i's FFN and block i+1's attention input are one."""
        r, blocks = self.regions, self.blocks
        cross_backend = "sdpa" if backend == "flex" else backend
        q, k, v = r.attn_in(blocks[0], x, mod, *rope, self_attention.destination(0))
        for i, block in enumerate(blocks):
            x, q = r.attn_out(block, x, self_attention(i, q, k, v), mod)
            cross = text.attend(i, q, cross_backend)
            if i + 1 == len(blocks):
                return r.ffn_out(block, x, cross, mod)
            x, q, k, v = r.ffn_out_attn_in(block, blocks[i + 1], x, cross, mod, *rope, self_attention.destination(i + 1))
        return x

    def forward_video(self, latents: torch.Tensor, timesteps: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      text: TextAttentionFn, self_attention: SelfAttentionFn,
                      backend: str = "sdpa") -> torch.Tensor:
        """Velocity for a video chunk [B, 48, F, H, W]; timesteps [B, F]; rope = self.rope(grid ids)."""
        _, _, f, h, w = latents.shape
        temb, mod = self.time_embed(timesteps, action=False)
        out = self.trunk(self.embed_video(latents), temb, mod, rope, text, self_attention, backend)
        return self.unpatchify(self.proj_out(out), f, h, w)

    def forward_actions(self, actions: torch.Tensor, timesteps: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                        text: TextAttentionFn, self_attention: SelfAttentionFn,
                      backend: str = "sdpa") -> torch.Tensor:
        """Velocity for an action chunk [B, 30, F, N, 1]; timesteps [B, F]; rope = self.rope(grid ids)."""
        b, a, f, n, w = actions.shape
        temb, mod = self.time_embed(timesteps, action=True)
        out = self.trunk(self.embed_actions(actions), temb, mod, rope, text, self_attention, backend)
        return self.action_proj_out(out).transpose(1, 2).reshape(b, a, f, n, w)

    def forward_train(self, video_noisy: torch.Tensor, video_clean: torch.Tensor, video_t: torch.Tensor,
                      video_cond_t: torch.Tensor, action_noisy: torch.Tensor, action_clean: torch.Tensor,
                      action_t: torch.Tensor, action_cond_t: torch.Tensor, text_emb: torch.Tensor,
                      self_attention: SelfAttentionFn, backend: str = "sdpa",
                      frame_offset: float = 0.0, forward_dynamics: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced forward over [noisy video | clean video | noisy actions | clean actions], and with
        `forward_dynamics` the clean actions once more at their positions (the training objective's
        forward-dynamics segment; only the mask tells it apart).

        Returns the velocity for the noisy video [B, 48, F, H, W] and noisy actions [B, 30, F, N, 1].
        `self_attention` carries the block-causal mask (see training.py).
        """
        b, _, fv, h, w = video_noisy.shape
        _, a, fa, n, aw = action_noisy.shape
        ph, pw = self.config.patch_size[1:]
        vtok = self.video_tokens_per_frame(h, w)
        atok = n * aw
        segments = [(self.embed_video(video_noisy), video_t, False, vtok),
                    (self.embed_video(video_clean), video_cond_t, False, vtok),
                    (self.embed_actions(action_noisy), action_t, True, atok),
                    (self.embed_actions(action_clean), action_cond_t, True, atok)]
        segments += segments[-1:] if forward_dynamics else []
        x = torch.cat([s[0] for s in segments], dim=1)
        # The parts have different tokens per frame: modulate token by token.
        parts = [(self.time_embed(t, action), n_tok) for _, t, action, n_tok in segments]
        temb = torch.cat([p[0].repeat_interleave(n_tok, dim=1) for p, n_tok in parts], dim=1)
        mod = torch.cat([p[1].repeat_interleave(n_tok, dim=1) for p, n_tok in parts], dim=1)
        vgrid = grid_ids(fv, h // ph, w // pw, frame_offset, device=x.device)
        agrid = grid_ids(fa, n, aw, frame_offset, action=True, device=x.device)
        rope = self.rope(torch.cat([vgrid, vgrid] + [agrid] * (len(segments) - 2), dim=1))
        out = self.trunk(x, temb, mod, rope, self.text_context(text_emb), self_attention, backend)
        lv, la = fv * vtok, fa * atok
        video = self.unpatchify(self.proj_out(out[:, :lv]), fv, h, w)
        action = self.action_proj_out(out[:, 2 * lv:2 * lv + la]).transpose(1, 2).reshape(b, a, fa, n, aw)
        return video, action


# ----- checkpoint folders -----

class CheckpointError(ValueError):
    pass


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / WEIGHTS_INDEX_NAME
    files = ([folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
             if index.exists() else [folder / WEIGHTS_NAME])
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: weights file is missing")
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
                       for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or misshapen:
        lines = [f"{source}: checkpoint does not match the transformer config"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
            if names:
                lines.append(f"  {title} ({len(names)}): " + ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
        raise CheckpointError("\n".join(lines))


def load_transformer(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> LingBotVATransformer:
    """Load a released-format `transformer/` folder by parameter name and shape."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: transformer folder does not exist")
    cfg = TransformerConfig.from_file(folder / "config.json")
    with torch.device("meta"):
        model = LingBotVATransformer(cfg)
    state = _read_state_dict(folder)
    check_state_dict(model, state, str(folder))
    model.load_state_dict(state, assign=True)
    return model.to(device).to_dtype(dtype).eval()


def shard_names(state: dict[str, torch.Tensor], max_shard_bytes: int | None) -> dict[str, str]:
    """Parameter name -> weights file: one file, or diffusers' shards
    `diffusion_pytorch_model-0000i-of-0000n.safetensors` of at most `max_shard_bytes` each
    (a tensor larger than that gets a shard of its own)."""
    if max_shard_bytes is None:
        return dict.fromkeys(state, WEIGHTS_NAME)
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    stem, suffix = WEIGHTS_NAME.split(".", 1)
    return {name: f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{suffix}" for i, names in enumerate(shards)
            for name in names}


def save_transformer(model: LingBotVATransformer, folder: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
    """Write config.json and the safetensors weights (the released layout) atomically; with
    `max_shard_bytes`, sharded with an index, as the released checkpoints are."""

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(model.config.to_json_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        files = shard_names(state, max_shard_bytes)
        for file in dict.fromkeys(files.values()):
            save_file({k: v for k, v in state.items() if files[k] == file}, str(tmp / file), metadata={"format": "pt"})
        if max_shard_bytes is not None:
            total = sum(v.numel() * v.element_size() for v in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": files}
            (tmp / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    write_folder_atomically(folder, write)


def write_unsharded(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """`src`'s transformer folder (sharded or not) as config.json + one weights file, every tensor
    as stored (bf16 weights stay bf16, the fp32 modulation path stays fp32)."""
    src = Path(src)
    state = _read_state_dict(src)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_bytes((src / "config.json").read_bytes())
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})

    return write_folder_atomically(dst, write)


def build_transformer(cfg: TransformerConfig, seed: int | None = 0, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> LingBotVATransformer:
    """A randomly initialised transformer (tests, benchmarks); `device='meta'` for counting."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = LingBotVATransformer(cfg)
    if str(device) == "meta":
        return model
    return model.to_dtype(dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
