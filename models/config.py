"""Typed configuration of LingBot-VA and its named presets.

`TransformerConfig` mirrors the released `transformer/config.json` keys one to one, so the
released folders load without edits. A `Preset` adds what the checkpoint does not carry:
cameras and their latent layout, chunking, the action channel map, normalisation statistics
and sampling settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .atomic import read_json
from .codec import decode, encode

# `attn_mode` is chosen at run time here (see attention.py); the released configs carry it
# and upstream users hand-edit it between training and inference, so it is read and ignored.
_IGNORED_CONFIG_KEYS = {"attn_mode"}

ACTION_DIM = 30
LEFT_EEF = tuple(range(0, 7))
RIGHT_EEF = tuple(range(7, 14))
LEFT_JOINTS = tuple(range(14, 21))
RIGHT_JOINTS = tuple(range(21, 28))
LEFT_GRIPPER = 28
RIGHT_GRIPPER = 29


@dataclass(frozen=True)
class TransformerConfig:
    num_layers: int = 30
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    ffn_dim: int = 14336
    in_channels: int = 48
    out_channels: int = 48
    action_dim: int = ACTION_DIM
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_json_dict(self) -> dict:
        return {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.36.0", "attn_mode": "flex",
                **encode(self)}

    @classmethod
    def from_json_dict(cls, raw: dict, source: str = "config") -> "TransformerConfig":
        """diffusers' keys (`_class_name`, ...) and those in _IGNORED_CONFIG_KEYS are skipped."""
        return decode(cls, {k: v for k, v in raw.items() if not k.startswith("_") and k not in _IGNORED_CONFIG_KEYS},
                      source)

    @classmethod
    def from_file(cls, path: str | Path) -> "TransformerConfig":
        return cls.from_json_dict(read_json(path, "transformer config.json"), source=str(path))


@dataclass(frozen=True)
class SamplingConfig:
    video_steps: int = 25
    action_steps: int = 50
    video_shift: float = 5.0
    action_shift: float = 1.0
    guidance_scale: float = 5.0
    action_guidance_scale: float = 1.0
    attn_window: int = 72
    # Truncated video denoising, in either of two ways (models/flow_matching.Schedule.make):
    # - video_exec_step (upstream's): only the first k video passes run, k <= video_steps + 1, the
    #   last writing the chunk into the cache at its own noise level; -1: all, the last at t = 0.
    # - video_stop (the paper's deployment, 3 steps "to s = 0.6": 0.4): the video steps go from
    #   noise 1 down to this level instead of 0, and the cache pass runs there. Training noises the
    #   video history to s ~ U[0.5, 1] half the time, so the action passes can read it.
    video_exec_step: int = -1
    video_stop: float = 0.0

    def __post_init__(self) -> None:
        if self.video_steps < 1 or self.action_steps < 1:
            raise ValueError(f"sampling: video_steps {self.video_steps} and action_steps {self.action_steps} "
                             f"must be at least 1")
        if self.video_exec_step != -1 and not 1 <= self.video_exec_step <= self.video_steps + 1:
            raise ValueError(f"sampling: video_exec_step {self.video_exec_step} must be -1 or 1..{self.video_steps + 1} "
                             f"(video_steps + 1)")
        if not 0.0 <= self.video_stop < 1.0:
            raise ValueError(f"sampling: video_stop {self.video_stop} must be in [0, 1)")
        if self.video_stop > 0 and self.video_exec_step != -1:
            raise ValueError("sampling: set video_exec_step or video_stop, not both")

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale > 1 or self.action_guidance_scale > 1


def default_operating_points(sampling: SamplingConfig) -> dict[str, SamplingConfig]:
    """`released`: the checkpoint's own settings; `paper`: the paper's deployment (3 video steps
    stopped at s = 0.6, 10 action steps); `fast`: video 2 / action 4 (78% against 82% for the released
    settings on the small ALOHA policy, bench/results/policy_aloha.md)."""
    return {
        "released": sampling,
        "paper": dataclasses.replace(sampling, video_steps=3, video_stop=0.4, video_exec_step=-1, action_steps=10),
        "fast": dataclasses.replace(sampling, video_steps=2, video_stop=0.0, video_exec_step=-1, action_steps=4),
    }


def check_operating_point(name: str, point: SamplingConfig, base: SamplingConfig) -> None:
    """A session's cache is sized by the window and batched by CFG: an operating point keeps both."""
    if point.attn_window != base.attn_window or point.use_cfg != base.use_cfg:
        raise ValueError(f"operating point {name!r}: attn_window and the use of CFG must be those of the policy "
                         f"({base.attn_window}, {'CFG' if base.use_cfg else 'no CFG'})")


@dataclass(frozen=True)
class Camera:
    key: str
    height: int
    width: int


@dataclass(frozen=True)
class VAEConfig:
    """Sizes of diffusers' AutoencoderKLWan; the real one is Wan2.2 (48 channels, 16x, 4x)."""

    base_dim: int = 160
    decoder_base_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2
    in_channels: int = 12
    out_channels: int = 12
    is_residual: bool = True
    scale_factor_spatial: int = 16
    scale_factor_temporal: int = 4


@dataclass(frozen=True)
class TextEncoderConfig:
    """Sizes of transformers' UMT5EncoderModel; the real one is UMT5-XXL."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    max_length: int = 512


@dataclass(frozen=True)
class Preset:
    name: str
    transformer: TransformerConfig
    cameras: tuple[Camera, ...]
    layout: Literal["tshape", "side_by_side"]
    used_action_channels: tuple[int, ...]
    norm_q01: tuple[float, ...]
    norm_q99: tuple[float, ...]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    frame_chunk_size: int = 2
    action_per_frame: int = 16
    frames_per_latent: int = 4
    fps: int = 10
    # The robot's action rate the policy was made for, where it is fixed (the ALOHA sim's demos and
    # evaluation run at 10 actions/s); None: any dataset rate (the released presets resample).
    control_fps: int | None = None
    # Seed of the random weights of a preset trained from scratch.
    init_seed: int = 0
    # Named sampling settings a session may choose at reset (policy.json `operating_points`);
    # empty: `default_operating_points(sampling)`.
    operating_points: tuple[tuple[str, SamplingConfig], ...] = ()

    def operating_point_settings(self) -> dict[str, SamplingConfig]:
        return dict(self.operating_points) or default_operating_points(self.sampling)

    def operating_point(self, name: str) -> SamplingConfig:
        """The named sampling settings (policy.json's were checked to fit a session's cache when read)."""
        points = self.operating_point_settings()
        if name not in points:
            raise ValueError(f"operating_point {name!r}: this model offers {', '.join(sorted(points))}")
        return points[name]

    @property
    def latent_hw(self) -> tuple[int, int]:
        s = self.vae.scale_factor_spatial
        main = self.cameras[0]
        if self.layout == "tshape":
            return (main.height // s) * 3 // 2, main.width // s
        return main.height // s, (main.width // s) * len(self.cameras)

    @property
    def action_mask(self) -> tuple[bool, ...]:
        used = set(self.used_action_channels)
        return tuple(c in used for c in range(self.transformer.action_dim))

    def replace(self, **changes) -> "Preset":
        return dataclasses.replace(self, **changes)


ROBOTWIN_CAMERAS = (
    Camera("observation.images.cam_high", 256, 320),
    Camera("observation.images.cam_left_wrist", 128, 160),
    Camera("observation.images.cam_right_wrist", 128, 160),
)
ROBOTWIN_CHANNELS = LEFT_EEF + (LEFT_GRIPPER,) + RIGHT_EEF + (RIGHT_GRIPPER,)
_ROBOTWIN_Q01 = (
    -0.06172713458538055, -3.6716461181640625e-05, -0.08783501386642456, -1.0, -1.0, -1.0, -1.0,
    -0.3547105032205582, -1.3113021850585938e-06, -0.11975435614585876, -1.0, -1.0, -1.0, -1.0,
) + (0.0,) * 16
_ROBOTWIN_Q99 = (
    0.3462600058317184, 0.39966784834861746, 0.14745532035827624, 1.0, 1.0, 1.0, 1.0,
    0.034201726913452024, 0.39142737388610793, 0.1792279863357542, 1.0, 1.0, 1.0, 1.0,
) + (0.0,) * 14 + (1.0, 1.0)

# LIBERO (one Franka arm, upstream's `va_libero_cfg` as updated on 2026-04-24 for the released
# LIBERO-Long checkpoint): the dataset's 7-dim action (delta xyz, delta axis-angle, gripper) sits in
# model channels 0-6 in that order, so the gripper is channel 6 (not the bimanual layout's 28).
LIBERO_CHANNELS = tuple(range(0, 7))
_LIBERO_Q01 = (
    -0.6589285731315613, -0.84375, -0.9375, -0.12107142806053162, -0.15964286029338837,
    -0.26571428775787354, -1.0,
) + (0.0,) * 23
_LIBERO_Q99 = (
    0.8999999761581421, 0.8544642925262451, 0.9375, 0.17142857611179352, 0.1842857152223587,
    0.34392857551574707, 1.0,
) + (0.0,) * 23
LIBERO_CAMERAS = (Camera("observation.images.agentview_rgb", 128, 128),
                  Camera("observation.images.eye_in_hand_rgb", 128, 128))

# ALOHA (the embedded MuJoCo sim): 14 joint positions -> left joints 14-19, left gripper 28,
# right joints 21-26, right gripper 29 (six arm joints each; the seventh joint slot stays unused).
ALOHA_CHANNELS = tuple(range(14, 20)) + (LEFT_GRIPPER,) + tuple(range(21, 27)) + (RIGHT_GRIPPER,)
ALOHA_CAMERAS = (Camera("observation.images.top", 64, 96),)

TINY_TRANSFORMER = TransformerConfig(
    num_layers=2, num_attention_heads=2, attention_head_dim=24, ffn_dim=96, text_dim=40,
    freq_dim=32,
)
TINY_VAE = VAEConfig(base_dim=16, decoder_base_dim=24, z_dim=48, dim_mult=(1, 1, 1, 1),
                     num_res_blocks=1)
TINY_TEXT = TextEncoderConfig(vocab_size=32128, d_model=40, d_kv=8, d_ff=64, num_layers=1,
                              num_heads=2, max_length=512)

# `small`: the same classes sized to train on the ALOHA sim tasks from scratch on one GPU (21.7 M
# transformer parameters, 43 MB in bf16; bench/results/policy_aloha.md has where that stands). Heads
# keep the released 128 dims (the rotary split f/h/w = 44/42/42 and the attention kernels are the
# ones the released model uses); the top camera at 192x256 keeps the render's 3:4 aspect (12x16
# latent, 48 tokens per frame); the VAE and text encoder are small random networks (no offline weights).
SMALL_CAMERAS = (Camera("observation.images.top", 192, 256),)
SMALL_TRANSFORMER = TransformerConfig(
    num_layers=8, num_attention_heads=3, attention_head_dim=128, ffn_dim=1536, text_dim=64, freq_dim=256,
)
SMALL_VAE = VAEConfig(base_dim=32, decoder_base_dim=16, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
SMALL_TEXT = TextEncoderConfig(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                               max_length=64)

PRESETS: dict[str, Preset] = {
    "robotwin": Preset(
        name="robotwin",
        transformer=TransformerConfig(),
        cameras=ROBOTWIN_CAMERAS,
        layout="tshape",
        used_action_channels=ROBOTWIN_CHANNELS,
        norm_q01=_ROBOTWIN_Q01,
        norm_q99=_ROBOTWIN_Q99,
        sampling=SamplingConfig(video_steps=25, action_steps=50, attn_window=72),
    ),
    "libero": Preset(
        name="libero",
        transformer=TransformerConfig(),
        cameras=LIBERO_CAMERAS,
        layout="side_by_side",
        used_action_channels=LIBERO_CHANNELS,
        norm_q01=_LIBERO_Q01,
        norm_q99=_LIBERO_Q99,
        # upstream: 20 video steps at shift 5, 50 action steps at shift 0.05 (the action schedule then
        # spends most steps at low noise: sigma 0.5 is shifted to 0.048), window 30
        sampling=SamplingConfig(video_steps=20, action_steps=50, video_shift=5.0, action_shift=0.05,
                                guidance_scale=5.0, action_guidance_scale=1.0, attn_window=30),
        # 4 latent frames x 4 actions: 16 actions per chunk (12 in the first, whose first latent frame
        # is the initial image), a camera keyframe after every action
        frame_chunk_size=4,
        action_per_frame=4,
    ),
    "tiny": Preset(
        name="tiny",
        transformer=TINY_TRANSFORMER,
        cameras=ALOHA_CAMERAS,
        layout="side_by_side",
        used_action_channels=ALOHA_CHANNELS,
        norm_q01=(-1.0,) * ACTION_DIM,
        norm_q99=(1.0,) * ACTION_DIM,
        sampling=SamplingConfig(video_steps=3, action_steps=4, attn_window=8),
        vae=TINY_VAE,
        text_encoder=TINY_TEXT,
        action_per_frame=16,
        control_fps=10,
    ),
    "small": Preset(
        name="small",
        transformer=SMALL_TRANSFORMER,
        cameras=SMALL_CAMERAS,
        layout="side_by_side",
        used_action_channels=ALOHA_CHANNELS,
        norm_q01=(-1.0,) * ACTION_DIM,
        norm_q99=(1.0,) * ACTION_DIM,
        # The released RoboTwin steps and guidance; an ALOHA episode is 3-4 chunks, so a window of
        # 16 chunks never evicts.
        sampling=SamplingConfig(video_steps=25, action_steps=50, attn_window=16),
        vae=SMALL_VAE,
        text_encoder=SMALL_TEXT,
        action_per_frame=16,
        control_fps=10,
        # bench/vae_probe.py: a linear probe reads the cube's position from seed 1's latents to 0.45 cm
        # (pixels of the same size: 0.60 cm), from seed 0's not at all (7.2 cm, the mean's error).
        init_seed=1,
    ),
}


# Presets trained from random weights (no released checkpoint): the pipeline's base-model step may
# start them without a base checkpoint.
RANDOM_INIT_PRESETS = ("tiny", "small")


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
