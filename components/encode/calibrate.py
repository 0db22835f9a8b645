"""Fit a random VAE's latent statistics to a dataset's frames.

A VAE with random weights (the `tiny` and `small` presets: nothing pretrained is reachable offline)
has `latents_mean/latents_std` that are draws, not measurements: on the ALOHA demos the small
preset's normalised latents varied by 0.03-0.17 per channel around offsets up to +-1, a few percent
of flow matching's unit noise. Measured on the data the policy will see, each channel is zero-mean and
unit-scale.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vaops.components.dataset import LeRobotData
from vaops.models.config import Preset
from vaops.models.observation import frames_to_video
from vaops.models.vae import fit_latent_stats

# Frames per episode: reset, approach, grasp, hand-over and release of the 49-frame sim demos
# (indices past an episode's end are skipped).
CALIBRATION_FRAMES = (0, 12, 24, 36, 48)


def calibrate_vae(vae, dataset: str | Path, preset: Preset, frames: tuple[int, ...] = CALIBRATION_FRAMES) -> dict:
    """Sets the VAE's latent statistics from `frames` of every episode and camera; returns them."""
    data = LeRobotData(dataset)
    clips = []
    for meta in data.episodes:
        for cam in preset.cameras:
            video = data.video(meta.episode_index, cam.key)
            picks = [i for i in frames if i < len(video)]
            clips.append(frames_to_video(video[picks], cam.height, cam.width).transpose(0, 1))  # [T, 3, H, W]
    if not clips:
        raise ValueError(f"{dataset}: no episodes to fit the VAE's latent statistics on")
    images = torch.cat(clips)
    mean, std = fit_latent_stats(vae, images)
    return {"latents_mean": mean, "latents_std": std, "frames": len(images)}
