"""The `robotwin` and `libero` presets against the released configurations, field by field.

Every leaf field of `Preset` (nested dataclasses flattened to dotted names) must either have its
released value written below, with where it comes from, or be listed in `NOT_RELEASED` with the
reason no released file carries it; a field added to `Preset` later fails the test until it is
accounted for here.

Sources (upstream repository robbyant/lingbot-va, commit 7c6ffa9; `va_libero_cfg.py` as last changed
in 90f1fff on 2026-04-24, "modify settings for libero inference", which the README says the released
LIBERO-Long checkpoint needs):
- CFG_ROBOTWIN = `wan_va/configs/va_robotwin_cfg.py`, CFG_LIBERO = `wan_va/configs/va_libero_cfg.py`;
- SERVER = `wan_va/wan_va_server.py` (camera sizes per `env_type`, latent layout, text length);
- MODEL = `wan_va/modules/model.py`, `WanTransformer3DModel.__init__` defaults, the values of the
  released `transformer/config.json`;
- VAE = the Wan2.2 VAE's `vae/config.json` (Wan-AI/Wan2.2-TI2V-5B-Diffusers), the released `vae/`;
- UMT5 = google/umt5-xxl's `config.json`, the released `text_encoder/`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vaops.models.config import PRESETS, Preset, get_preset
from vaops.models.engine import EngineConfig
from vaops.models.flow_matching import Schedule
from vaops.models.policy import denormalize_actions, normalize_actions

# Model architecture, the same in every released checkpoint (MODEL; MODEL.md's published configuration).
TRANSFORMER = {
    "transformer.num_layers": 30, "transformer.num_attention_heads": 24, "transformer.attention_head_dim": 128,
    "transformer.ffn_dim": 14336, "transformer.in_channels": 48, "transformer.out_channels": 48,
    "transformer.action_dim": 30,  # also CFG_*: action_dim = 30
    "transformer.text_dim": 4096, "transformer.freq_dim": 256,
    "transformer.patch_size": (1, 2, 2),  # also shared_config.py: patch_size = (1, 2, 2)
    "transformer.cross_attn_norm": True, "transformer.eps": 1e-6, "transformer.rope_max_seq_len": 1024,
    "transformer.pos_embed_seq_len": None,
}
VAE = {  # Wan2.2 VAE, vae/config.json
    "vae.base_dim": 160, "vae.decoder_base_dim": 256, "vae.z_dim": 48, "vae.dim_mult": (1, 2, 4, 4),
    "vae.num_res_blocks": 2, "vae.temperal_downsample": (False, True, True), "vae.patch_size": 2,
    "vae.in_channels": 12, "vae.out_channels": 12, "vae.is_residual": True, "vae.scale_factor_spatial": 16,
    "vae.scale_factor_temporal": 4,
}
TEXT = {  # UMT5-XXL config.json; max_length: SERVER encodes prompts with max_sequence_length=512
    "text_encoder.vocab_size": 256384, "text_encoder.d_model": 4096, "text_encoder.d_kv": 64,
    "text_encoder.d_ff": 10240, "text_encoder.num_layers": 24, "text_encoder.num_heads": 64,
    "text_encoder.max_length": 512,
}
COMMON = {
    **TRANSFORMER, **VAE, **TEXT,
    # SERVER's client contract: a latent frame spans 4 camera frames (the VAE's 4x temporal compression;
    # upstream's clients take a keyframe every action_per_frame // 4 actions)
    "frames_per_latent": 4,
    # CFG_*: neither config fixes a robot control rate (the post-training data are resampled)
    "control_fps": None,
}

RELEASED: dict[str, dict[str, object]] = {
    "robotwin": {
        **COMMON,
        # CFG_ROBOTWIN: obs_cam_keys, height 256, width 320; SERVER: env_type 'robotwin_tshape' renders
        # the first camera at height x width and the two wrists at height // 2 x width // 2
        "cameras": (("observation.images.cam_high", 256, 320), ("observation.images.cam_left_wrist", 128, 160),
                    ("observation.images.cam_right_wrist", 128, 160)),
        "layout": "tshape",  # CFG_ROBOTWIN: env_type = 'robotwin_tshape'
        # CFG_ROBOTWIN: used_action_channel_ids = range(0, 7) + [28] + range(7, 14) + [29] (order = wire order)
        "used_action_channels": (0, 1, 2, 3, 4, 5, 6, 28, 7, 8, 9, 10, 11, 12, 13, 29),
        # CFG_ROBOTWIN: norm_stat q01 / q99
        "norm_q01": (-0.06172713458538055, -3.6716461181640625e-05, -0.08783501386642456, -1, -1, -1, -1,
                     -0.3547105032205582, -1.3113021850585938e-06, -0.11975435614585876, -1, -1, -1, -1)
                    + (0.0,) * 16,
        "norm_q99": (0.3462600058317184, 0.39966784834861746, 0.14745532035827624, 1, 1, 1, 1,
                     0.034201726913452024, 0.39142737388610793, 0.1792279863357542, 1, 1, 1, 1)
                    + (0.0,) * 14 + (1.0, 1.0),
        "sampling.video_steps": 25,  # CFG_ROBOTWIN: num_inference_steps
        "sampling.action_steps": 50,  # action_num_inference_steps
        "sampling.video_shift": 5.0,  # snr_shift
        "sampling.action_shift": 1.0,  # action_snr_shift
        "sampling.guidance_scale": 5.0,  # guidance_scale
        "sampling.action_guidance_scale": 1.0,  # action_guidance_scale
        "sampling.attn_window": 72,  # attn_window
        "sampling.video_exec_step": -1,  # video_exec_step
        "frame_chunk_size": 2,  # frame_chunk_size
        "action_per_frame": 16,  # action_per_frame
    },
    "libero": {
        **COMMON,
        # CFG_LIBERO: obs_cam_keys, height = width = 128; SERVER: any env_type but 'robotwin_tshape'
        # renders every camera at height x width and puts the latents side by side
        "cameras": (("observation.images.agentview_rgb", 128, 128),
                    ("observation.images.eye_in_hand_rgb", 128, 128)),
        "layout": "side_by_side",  # CFG_LIBERO: env_type = 'none'
        "used_action_channels": (0, 1, 2, 3, 4, 5, 6),  # CFG_LIBERO: used_action_channel_ids = range(0, 7)
        # CFG_LIBERO: norm_stat q01 / q99 (the gripper in channel 6: -1 / 1)
        "norm_q01": (-0.6589285731315613, -0.84375, -0.9375, -0.12107142806053162, -0.15964286029338837,
                     -0.26571428775787354, -1.0) + (0.0,) * 23,
        "norm_q99": (0.8999999761581421, 0.8544642925262451, 0.9375, 0.17142857611179352, 0.1842857152223587,
                     0.34392857551574707, 1.0) + (0.0,) * 23,
        "sampling.video_steps": 20,  # CFG_LIBERO: num_inference_steps
        "sampling.action_steps": 50,  # action_num_inference_steps
        "sampling.video_shift": 5.0,  # snr_shift
        "sampling.action_shift": 0.05,  # action_snr_shift
        "sampling.guidance_scale": 5.0,  # guidance_scale
        "sampling.action_guidance_scale": 1.0,  # action_guidance_scale
        "sampling.attn_window": 30,  # attn_window
        "sampling.video_exec_step": -1,  # video_exec_step
        "frame_chunk_size": 4,  # frame_chunk_size
        "action_per_frame": 4,  # action_per_frame
    },
}

NOT_RELEASED = {
    "name": "vaops' own preset name (upstream names the config by file: va_<name>_cfg)",
    "fps": "the rate latent frames sample a dataset's video; the released datasets carry it per latent "
           "file (5-15), the released server never reads it",
    "init_seed": "seed of random initial weights; the released presets load weights",
    "operating_points": "vaops' named sampling settings a session picks at reset (empty: derived from "
                        "`sampling`); upstream has one setting per config",
    "sampling.video_stop": "the paper's early stop at a noise level (its p.10 deployment); upstream's "
                           "configs truncate by step count only (video_exec_step); 0 = not stopped early",
}


def _leaves(obj, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = prefix + f.name
        if f.name == "cameras":
            out[name] = tuple((c.key, c.height, c.width) for c in value)
        elif dataclasses.is_dataclass(value):
            out.update(_leaves(value, name + "."))
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_every_field_is_accounted_for(name):
    fields = set(_leaves(PRESETS[name]))
    released = set(RELEASED[name])
    assert fields - released - set(NOT_RELEASED) == set(), "a preset field without its released value"
    assert released - fields == set(), "a released value for a field the preset lacks"
    assert released.isdisjoint(NOT_RELEASED)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_every_field_matches_the_released_config(name):
    leaves = _leaves(PRESETS[name])
    wrong = {k: (leaves[k], v) for k, v in RELEASED[name].items() if leaves[k] != v}
    assert wrong == {}, "(preset, released)"


def test_libero_chunk_is_upstreams():
    """12 actions in the first chunk (its first latent frame is the initial image) and 16 after it, one
    camera keyframe after every action: what upstream's LIBERO client executes per call."""
    p = get_preset("libero")
    per_chunk = p.frame_chunk_size * p.action_per_frame
    assert (per_chunk - p.action_per_frame, per_chunk) == (12, 16)
    assert p.action_per_frame // p.frames_per_latent == 1
    engine = EngineConfig.from_preset(p)
    assert (engine.frame_chunk_size, engine.action_per_frame, engine.latent_height, engine.latent_width) == (4, 4, 8, 16)


def test_libero_gripper_is_model_channel_6():
    """A wire action [7, F, N] (xyz, axis-angle, gripper) lands in model channels 0-6; the gripper's
    +-1 (closed / open) normalises to +-1 in channel 6 and comes back out of channel 6."""
    p = get_preset("libero")
    q01, q99 = torch.tensor(p.norm_q01), torch.tensor(p.norm_q99)
    wire = torch.zeros(7, 1, 2)
    wire[:, 0, 0] = torch.tensor([0.9, -0.84375, 0.9375, 0.0, 0.0, 0.0, 1.0])
    wire[6, 0, 1] = -1.0
    model = torch.zeros(30, 1, 2)
    model[list(p.used_action_channels)] = wire
    normed = normalize_actions(model, q01, q99)
    np.testing.assert_allclose(normed[6, 0].numpy(), [1.0, -1.0], atol=1e-5)
    np.testing.assert_allclose(normed[:3, 0, 0].numpy(), [1.0, -1.0, 1.0], atol=1e-4)
    assert p.action_mask == (True,) * 7 + (False,) * 23
    back = denormalize_actions(normed, q01, q99)[list(p.used_action_channels)]
    np.testing.assert_allclose(back.numpy(), wire.numpy(), atol=1e-5)


def test_libero_action_schedule_shift():
    """Shift 0.05 keeps most of the 50 action steps at low noise: sigma 0.5 becomes 0.05 * 0.5 /
    (1 - 0.95 * 0.5) = 0.0476; the unshifted schedule (shift 1) has 25 steps above 0.5, this one 3
    (those above 0.5 / 0.525 = 0.952 before the shift)."""
    p = get_preset("libero")
    sigmas = Schedule.make(p.sampling.action_steps, p.sampling.action_shift).sigmas
    assert sigmas.shape == (50,)
    assert float(sigmas[25]) == pytest.approx(0.05 * 0.5 / (1 - 0.95 * 0.5), rel=1e-5)
    assert int((sigmas > 0.5).sum()) == 3
    assert int((Schedule.make(50, 1.0).sigmas > 0.5).sum()) == 25


def test_presets_are_preset_instances():
    assert all(isinstance(p, Preset) for p in PRESETS.values())
