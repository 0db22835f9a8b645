"""Camera images <-> the model's latent frames, in a preset's camera layout.

"tshape" (RoboTwin): the high camera at full size and the two wrist cameras at half size;
the two wrist latents side by side (width) sit above the high-camera latent (height).
"side_by_side": every camera at the same size, latents concatenated along the width.
Cameras of one size are encoded together as one batch, each group with its own causal
streaming state, as upstream's server does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from vaops.models.config import Camera, Preset
from vaops.models.vae import StreamingEncoder, decode, latent_stats, normalize_latents

if TYPE_CHECKING:  # diffusers is imported where a VAE is made (models/vae.py)
    from diffusers import AutoencoderKLWan


def frames_to_video(frames: np.ndarray, height: int, width: int,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 `[T, H, W, 3]` -> float `[3, T, height, width]` in [-1, 1], on `device` (default the CPU): the
    frames travel there as uint8, a quarter of the float bytes, and are converted there.

    Bilinear resize (align_corners False) on the 0-255 values, then scaling, in upstream's order. Frames
    already `height x width` skip the resize, which maps them onto themselves exactly: the served robotwin
    cameras' 16 frames a chunk took 26 against 7 ms on 2 CPU cores (stop 36), per robot and chunk.
    """
    video = torch.from_numpy(np.ascontiguousarray(frames)).to(device).float().permute(3, 0, 1, 2)
    if tuple(video.shape[2:]) != (height, width):
        video = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=False)
    return video / 255.0 * 2.0 - 1.0


def video_to_frames(video: torch.Tensor) -> np.ndarray:
    """float `[3, T, H, W]` in [-1, 1] -> uint8 `[T, H, W, 3]`."""
    video = ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (video * 255.0).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def _camera_groups(preset: Preset) -> list[tuple[Camera, ...]]:
    cams = preset.cameras
    s = preset.vae.scale_factor_spatial
    for cam in cams:
        if cam.height % s or cam.width % s:
            raise ValueError(f"preset {preset.name!r}: camera {cam.key} size {cam.height}x{cam.width} "
                             f"is not a multiple of the VAE's {s}x downsampling")
    if preset.layout == "tshape":
        main = cams[0]
        if len(cams) != 3 or any((c.height, c.width) != (main.height // 2, main.width // 2) for c in cams[1:]):
            raise ValueError(f"preset {preset.name!r}: the tshape layout needs one main camera and two "
                             f"wrist cameras at half its size, got {cams}")
        return [(main,), cams[1:]]
    if preset.layout == "side_by_side":
        if len({(c.height, c.width) for c in cams}) != 1:
            raise ValueError(f"preset {preset.name!r}: side_by_side needs cameras of one size, got {cams}")
        return [cams]
    raise ValueError(f"preset {preset.name!r}: unknown camera layout {preset.layout!r}")


def _latent_size(cam: Camera, preset: Preset) -> tuple[int, int]:
    s = preset.vae.scale_factor_spatial
    return cam.height // s, cam.width // s


def compose_layout(latents: Mapping[str, torch.Tensor], preset: Preset) -> torch.Tensor:
    """Per-camera latents `{key: [B, C, F, h, w]}` -> the preset's layout `[B, C, F, H, W]`."""
    cams = preset.cameras
    if preset.layout == "tshape":
        wrists = torch.cat([latents[c.key] for c in cams[1:]], dim=-1)
        return torch.cat([wrists, latents[cams[0].key]], dim=-2)
    return torch.cat([latents[c.key] for c in cams], dim=-1)


def split_layout(latent: torch.Tensor, preset: Preset) -> dict[str, torch.Tensor]:
    """Inverse of `compose_layout`."""
    if tuple(latent.shape[-2:]) != preset.latent_hw:
        raise ValueError(f"latent is {tuple(latent.shape[-2:])} high x wide, preset {preset.name!r} "
                         f"lays its cameras out in {preset.latent_hw}")
    cams = preset.cameras
    if preset.layout == "tshape":
        main_h, _ = _latent_size(cams[0], preset)
        top, bottom = latent[..., :-main_h, :], latent[..., -main_h:, :]
        wrist_w = [_latent_size(c, preset)[1] for c in cams[1:]]
        return {cams[0].key: bottom, **dict(zip((c.key for c in cams[1:]), top.split(wrist_w, dim=-1)))}
    widths = [_latent_size(c, preset)[1] for c in cams]
    return dict(zip((c.key for c in cams), latent.split(widths, dim=-1)))


class ObservationEncoder:
    """Streams camera frames of one episode into normalised layout latents `[1, C, t, H, W]`.

    The first `encode` after `reset()` takes `1 + 4k` frames per camera, later calls `4k`.
    """

    def __init__(self, vae: AutoencoderKLWan, preset: Preset):
        self.vae = vae
        self.preset = preset
        self._groups = [(cams, StreamingEncoder(vae)) for cams in _camera_groups(preset)]

    def reset(self) -> None:
        for _, stream in self._groups:
            stream.reset()

    def encode(self, frames: Mapping[str, np.ndarray]) -> torch.Tensor:
        """`{camera key: uint8 [T, H, W, 3]}` (any H, W; keys beyond the preset's are ignored)."""
        counts = set()
        for cam in self.preset.cameras:
            if cam.key not in frames:
                raise KeyError(f"camera {cam.key!r} missing from the observation (got {sorted(frames)})")
            arr = np.asarray(frames[cam.key])
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
                raise ValueError(f"camera {cam.key!r}: expected uint8 [T, H, W, 3], "
                                 f"got {arr.dtype} {tuple(arr.shape)}")
            counts.add(arr.shape[0])
        if len(counts) != 1:
            raise ValueError(f"cameras carry different frame counts {sorted(counts)}")
        mus: dict[str, torch.Tensor] = {}
        device = next(self.vae.parameters()).device
        for cams, stream in self._groups:
            video = torch.stack([frames_to_video(np.asarray(frames[c.key]), c.height, c.width, device) for c in cams])
            mu = stream.encode(video)
            mus.update(zip((c.key for c in cams), mu.split(1, dim=0)))
        return normalize_latents(compose_layout(mus, self.preset), *latent_stats(self.vae))

    def decode(self, latent: torch.Tensor) -> dict[str, np.ndarray]:
        """Layout latent `[1, C, t, H, W]` -> `{camera key: uint8 [1 + 4(t-1), h, w, 3]}`."""
        if latent.ndim != 5 or latent.shape[0] != 1:
            raise ValueError(f"expected one layout latent [1, C, t, H, W], got shape {tuple(latent.shape)}")
        parts = split_layout(latent, self.preset)
        out: dict[str, np.ndarray] = {}
        for cams, _ in self._groups:
            video = decode(self.vae, torch.cat([parts[c.key] for c in cams], dim=0))
            out.update(zip((c.key for c in cams), (video_to_frames(v) for v in video)))
        return out

    def decode_mosaic(self, latent: torch.Tensor) -> np.ndarray:
        """Layout latent `[1, C, t, H, W]` -> one uint8 video `[1 + 4(t-1), 16H, 16W, 3]` of the whole
        layout, decoded in one pass as upstream renders its imagined videos."""
        return video_to_frames(decode(self.vae, latent)[0])


class VideoEncoder:
    """Camera frames -> normalised latents `[C, f, h, w]` with the VAE's causal streaming cache,
    `chunk` latent frames per call (memory bounded by the chunk, not the clip)."""

    def __init__(self, vae, chunk_latent_frames: int):
        self.vae = vae
        self.stream = StreamingEncoder(vae)
        self.step = vae.config.scale_factor_temporal * chunk_latent_frames
        self.stats = latent_stats(vae)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, camera: Camera) -> torch.Tensor:
        video = frames_to_video(frames, camera.height, camera.width)[None]  # [1, 3, T, H, W]
        self.stream.reset()
        parts = [self.stream.encode(video[:, :, :1 + self.step])]
        for t in range(1 + self.step, video.shape[2], self.step):
            parts.append(self.stream.encode(video[:, :, t:t + self.step]))
        return normalize_latents(torch.cat(parts, dim=2), *self.stats)[0]
