"""The training objective of MODEL.md: teacher-forced flow matching over video and actions.

`draw_inputs` turns a batch into one step's network inputs, drawing (from one generator, in a fixed
order) the text dropout, one timestep per latent frame from the 1000-step tables (video and
action shifts), the noise, the noisy history (the clean video noised with timesteps from the less
noisy half of the table, never the actions), optionally the first frame held clean as inference holds
it, the step's chunk size and attention window, and (forward_dynamics_prob > 0) the chunks whose
noisy video also sees its own chunk's clean actions.
`TeacherForcedModel` is what DeepSpeed wraps: the transformer's teacher-forced forward plus the
loss, per-frame weighted MSE for video plus per-frame masked weighted MSE for actions.

Forward dynamics (FD, issue 15): the engine's grounded asynchronous pass denoises a chunk's video
attending to the history before the chunk and to the chunk's executed actions, written at t=0
(models/engine.py `_reimagine_executing`). Teacher forcing never shows a chunk's noisy video its own
actions, so with forward_dynamics_prob > 0 the sequence gains a fifth segment, a copy of the clean
actions ("FD action tokens", models/attention.py `forward_dynamics_allowed`), and each chunk of
each sample is chosen with that probability to see its copy; a chosen chunk's video loss is the
FD loss. The FD tokens carry no loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from vaops.models.attention import (
    MaskedSelfAttention,
    forward_dynamics_block_mask,
    forward_dynamics_mask,
    teacher_forced_block_mask,
    teacher_forced_mask,
)
from vaops.models.config import Preset
from vaops.models.flow_matching import (
    NUM_TRAIN_TIMESTEPS,
    TrainTable,
    add_noise,
    frame_weighted_mse,
    sample_frame_indices,
    train_table,
    velocity_target,
)
from vaops.models.transformer import LingBotVATransformer, build_transformer, load_transformer

from .config import TrainConfig
from .data import Batch

HISTORY_LOW = NUM_TRAIN_TIMESTEPS // 2  # noisy history: table indices 500-999, the less noisy half


@dataclass(frozen=True)
class TeacherForcing:
    video: TrainTable
    action: TrainTable
    text_dropout: float
    noisy_history: float
    hold_first_frame: bool
    chunk_range: tuple[int, int]
    window_range: tuple[int, int]
    forward_dynamics: float = 0.0  # TrainConfig.forward_dynamics_prob

    @classmethod
    def from_config(cls, cfg: TrainConfig, preset: Preset) -> TeacherForcing:
        s = preset.sampling
        return cls(train_table(s.video_shift if cfg.video_shift is None else cfg.video_shift),
                   train_table(s.action_shift if cfg.action_shift is None else cfg.action_shift),
                   cfg.text_dropout, cfg.noisy_history, cfg.hold_first_frame, cfg.chunk_range, cfg.window_range,
                   cfg.forward_dynamics_prob)

    def to(self, device: torch.device | str) -> TeacherForcing:
        return dataclasses.replace(self, video=self.video.to(device), action=self.action.to(device))


@dataclass
class StepInputs:
    video_noisy: torch.Tensor  # [B, C, F, H, W]
    video_clean: torch.Tensor  # the history: clean, or noised at video_cond_t
    video_t: torch.Tensor  # [B, F] on the 0..1000 scale
    video_cond_t: torch.Tensor  # [B, F]
    video_target: torch.Tensor
    video_weight: torch.Tensor  # [B, F] the table's loss weight per frame
    action_noisy: torch.Tensor  # [B, A, F, N, 1], unused channels zero
    action_clean: torch.Tensor
    action_t: torch.Tensor
    action_target: torch.Tensor
    action_weight: torch.Tensor
    action_mask: torch.Tensor  # [B, A, F, N, 1] bool
    text_emb: torch.Tensor  # [B, 512, D]
    chunk: int
    window: int
    # [B, chunks] bool: the chunks whose noisy video sees its FD action tokens; None: no FD segment
    fd_chunks: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> StepInputs:
        """Move to `device`; model inputs (not targets, weights or masks) cast to `dtype`."""
        model_inputs = {"video_noisy", "video_clean", "action_noisy", "action_clean", "text_emb"}
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, dtype if dtype is not None and f.name in model_inputs else None, non_blocking=True)
            out[f.name] = v
        return StepInputs(**out)

    @property
    def tokens(self) -> int:
        b, _, f, h, w = self.video_noisy.shape
        n = self.action_noisy.shape[3]
        return b * (2 * f * ((h // 2) * (w // 2) + n) + (0 if self.fd_chunks is None else f * n))


def _per_frame(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B, F] -> [B, 1, F, 1, ...] broadcastable against [B, C, F, ...] of `ndim` dims."""
    return values.view(values.shape[0], 1, values.shape[1], *([1] * (ndim - 3)))


def draw_inputs(batch: Batch, empty_emb: torch.Tensor, tf: TeacherForcing, generator: torch.Generator) -> StepInputs:
    """One step's inputs from a batch; every random draw comes from `generator`, in a fixed order, on
    its device. On a GPU the draws take ~1 ms; on one CPU thread they took most of an H200 step
    (1.5 s of 2 cores here for micro-batch 128 of the small recipe)."""
    device = generator.device
    on = {"generator": generator, "device": device}
    video_table, action_table = tf.video.to(device), tf.action.to(device)
    x0 = batch.latents.to(device, non_blocking=True).float()
    a0 = batch.actions.to(device, non_blocking=True).float()
    mask = batch.action_mask.to(device, non_blocking=True)
    text_emb = batch.text_emb.to(device, non_blocking=True)
    b, _, f = x0.shape[:3]

    drop = torch.rand(b, **on) < tf.text_dropout
    text = torch.where(drop.view(b, 1, 1), empty_emb.to(device, text_emb.dtype).expand_as(text_emb), text_emb)

    idx = sample_frame_indices(b, f, generator)
    noise = torch.randn(x0.shape, **on)
    video_noisy = add_noise(x0, noise, _per_frame(video_table.sigmas[idx], x0.ndim))

    noisy_history = torch.rand(b, **on) < tf.noisy_history
    hidx = sample_frame_indices(b, f, generator, low=HISTORY_LOW)
    hnoise = torch.randn(x0.shape, **on)
    history = add_noise(x0, hnoise, _per_frame(video_table.sigmas[hidx], x0.ndim))
    video_clean = torch.where(_per_frame(noisy_history.view(b, 1).expand(b, f), x0.ndim), history, x0)
    video_cond_t = torch.where(noisy_history.view(b, 1), video_table.timesteps[hidx], torch.zeros(b, f, device=device))

    aidx = sample_frame_indices(b, f, generator)
    anoise = torch.randn(a0.shape, **on)
    m = mask.float()
    action_noisy = add_noise(a0, anoise, _per_frame(action_table.sigmas[aidx], a0.ndim)) * m

    video_t, video_weight = video_table.timesteps[idx], video_table.weights[idx]
    action_t, action_weight = action_table.timesteps[aidx], action_table.weights[aidx]
    if tf.hold_first_frame:
        # The engine's first chunk: frame 0 is the observation (video) and zero (actions) at t=0.
        video_noisy[:, :, 0] = x0[:, :, 0]
        action_noisy[:, :, 0] = a0[:, :, 0] * m[:, :, 0]
        for t in (video_t, video_weight, action_t, action_weight):
            t[:, 0] = 0

    chunk = int(torch.randint(tf.chunk_range[0], tf.chunk_range[1] + 1, (1,), **on))
    window = int(torch.randint(tf.window_range[0], tf.window_range[1] + 1, (1,), **on))
    # Drawn last and only when asked for, so that every other draw is the same as without FD. Every
    # step with p > 0 carries the FD segment, chosen or not: one token count, one compiled kernel.
    fd_chunks = torch.rand(b, -(-f // chunk), **on) < tf.forward_dynamics if tf.forward_dynamics > 0 else None
    return StepInputs(
        video_noisy=video_noisy, video_clean=video_clean, video_t=video_t, video_cond_t=video_cond_t,
        video_target=velocity_target(x0, noise), video_weight=video_weight,
        action_noisy=action_noisy, action_clean=a0 * m, action_t=action_t,
        action_target=velocity_target(a0, anoise) * m, action_weight=action_weight,
        action_mask=mask, text_emb=text, chunk=chunk, window=window, fd_chunks=fd_chunks)


def flow_matching_loss(video_pred: torch.Tensor, action_pred: torch.Tensor, x: StepInputs) -> torch.Tensor:
    """[total, video, action]: per-frame weighted MSE (video) + per-frame masked weighted MSE (actions)."""
    video = frame_weighted_mse(video_pred, x.video_target, x.video_weight)
    action = frame_weighted_mse(action_pred, x.action_target, x.action_weight, x.action_mask)
    return torch.stack([video + action, video, action])


class TeacherForcedModel(nn.Module):
    """The module DeepSpeed trains: inputs -> loss terms. `transformer` keeps the released names."""

    def __init__(self, transformer: LingBotVATransformer, backend: str = "sdpa"):
        super().__init__()
        self.transformer = transformer
        self.backend = backend

    def attention_mask(self, x: StepInputs):
        t = self.transformer
        _, _, f, h, w = x.video_noisy.shape
        args = (f, t.video_tokens_per_frame(h, w), f, x.action_noisy.shape[3], x.chunk, x.window)
        device = str(x.video_noisy.device)
        flex = self.backend == "flex"
        if x.fd_chunks is not None:
            fd_mask = forward_dynamics_block_mask if flex else forward_dynamics_mask
            return fd_mask(*args, x.fd_chunks, device=device)
        return teacher_forced_block_mask(*args, device=device) if flex else teacher_forced_mask(*args, device=device)

    def predict(self, x: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocities for the noisy video and the noisy actions."""
        attn = MaskedSelfAttention(self.attention_mask(x), self.backend)
        return self.transformer.forward_train(
            x.video_noisy, x.video_clean, x.video_t, x.video_cond_t, x.action_noisy, x.action_clean, x.action_t,
            torch.zeros_like(x.action_t), x.text_emb, attn, backend=self.backend,
            forward_dynamics=x.fd_chunks is not None)

    def forward(self, x: StepInputs) -> torch.Tensor:
        return flow_matching_loss(*self.predict(x), x)


def build_model(cfg: TrainConfig, preset: Preset, base: Path | None, bf16: bool,
                device: torch.device | str = "cpu") -> LingBotVATransformer:
    """The transformer to train: the base checkpoint's or a seeded random one, on `device`."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    if base is not None:
        model = load_transformer(base / "transformer", dtype=dtype, device=device)
    else:
        model = build_transformer(preset.transformer, seed=cfg.seed, dtype=dtype, device=device)
    model.train()
    model.gradient_checkpointing = cfg.activation_checkpointing
    model.checkpoint_every = cfg.checkpoint_every
    if cfg.compile_blocks:
        model.compile_blocks()
    return model
