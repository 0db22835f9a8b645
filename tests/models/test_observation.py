import numpy as np
import pytest
import torch

from vaops.models.config import TINY_VAE, Camera, get_preset
from vaops.models.observation import (
    ObservationEncoder,
    compose_layout,
    frames_to_video,
    split_layout,
    video_to_frames,
)
from vaops.models.vae import build_vae, decode, latent_stats, normalize_latents

# The published camera layouts with the tiny VAE (which still downsamples 16x spatially, 4x in time).
ROBOTWIN = get_preset("robotwin").replace(vae=TINY_VAE)
LIBERO = get_preset("libero").replace(vae=TINY_VAE)
TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def vae():
    return build_vae(TINY_VAE, seed=0)


def _frames(preset, num, seed, size=None):
    """Random uint8 camera clips; `size` overrides each camera's native (pre-resize) size."""
    rng = np.random.default_rng(seed)
    return {c.key: rng.integers(0, 256, (num, *(size or (c.height, c.width)), 3), dtype=np.uint8)
            for c in preset.cameras}


def _whole_clip_latent(vae, frames, cam):
    video = frames_to_video(frames[cam.key], cam.height, cam.width)[None]
    with torch.no_grad():
        mu = vae.encode(video).latent_dist.mean
    return normalize_latents(mu, *latent_stats(vae))


@pytest.fixture(scope="module")
def robotwin_run(vae):
    """Five frames per camera (native 240x320 / 120x160 as RoboTwin renders), streamed as 1 + 4."""
    frames = _frames(ROBOTWIN, 5, seed=0, size=(240, 320))
    for cam in ROBOTWIN.cameras[1:]:
        frames[cam.key] = frames[cam.key][:, ::2, ::2]
    enc = ObservationEncoder(vae, ROBOTWIN)
    first = enc.encode({k: v[:1] for k, v in frames.items()})
    second = enc.encode({k: v[1:] for k, v in frames.items()})
    return frames, enc, first, second


def test_tshape_latent_shape(robotwin_run):
    _, _, first, second = robotwin_run
    assert ROBOTWIN.latent_hw == (24, 20)
    assert first.shape == second.shape == (1, 48, 1, 24, 20)


def test_tshape_blocks_are_the_cameras_streamed(vae, robotwin_run):
    """Wrists side by side on top (left, right), high camera below; streaming == whole clip."""
    frames, _, first, second = robotwin_run
    latent = torch.cat([first, second], dim=2)
    high, left, right = ROBOTWIN.cameras
    expected = {
        high.key: (slice(8, 24), slice(0, 20)),
        left.key: (slice(0, 8), slice(0, 10)),
        right.key: (slice(0, 8), slice(10, 20)),
    }
    for cam in ROBOTWIN.cameras:
        rows, cols = expected[cam.key]
        whole = _whole_clip_latent(vae, frames, cam)
        assert (latent[:, :, :, rows, cols] - whole).abs().max().item() <= 1e-5


def test_side_by_side_libero(vae):
    frames = _frames(LIBERO, 5, seed=1)
    enc = ObservationEncoder(vae, LIBERO)
    latent = enc.encode(frames)
    assert latent.shape == (1, 48, 2, *LIBERO.latent_hw) == (1, 48, 2, 8, 16)
    for i, cam in enumerate(LIBERO.cameras):
        whole = _whole_clip_latent(vae, frames, cam)
        assert (latent[..., 8 * i:8 * (i + 1)] - whole).abs().max().item() <= 1e-5


def test_tiny_preset_and_reset(vae):
    enc = ObservationEncoder(vae, TINY)
    frames = _frames(TINY, 9, seed=2, size=(48, 64))
    a = torch.cat([enc.encode({k: v[:1] for k, v in frames.items()}),
                   enc.encode({k: v[1:] for k, v in frames.items()})], dim=2)
    assert a.shape == (1, 48, 3, *TINY.latent_hw)
    enc.reset()
    b = enc.encode(frames)
    assert (a - b).abs().max().item() <= 1e-5
    enc.reset()
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        enc.encode({k: v[:4] for k, v in frames.items()})


def test_frames_to_video_resizes_then_scales():
    frames = np.random.default_rng(3).integers(0, 256, (2, 16, 20, 3), dtype=np.uint8)
    same = frames_to_video(frames, 16, 20)
    assert same.shape == (3, 2, 16, 20)
    assert torch.equal(same, torch.from_numpy(frames).float().permute(3, 0, 1, 2) / 255.0 * 2.0 - 1.0)
    flat = frames_to_video(np.full((1, 30, 40, 3), 200, np.uint8), 16, 20)
    assert torch.allclose(flat, torch.full_like(flat, 200 / 255 * 2 - 1), atol=1e-6)
    ramp = np.repeat(np.arange(0, 256, 16, dtype=np.uint8)[None, None, :, None], 3, axis=3).repeat(4, axis=1)
    half = frames_to_video(ramp, 4, 8)
    # bilinear with align_corners=False halving a ramp averages neighbours: (0+16)/2, (32+48)/2, ...
    assert torch.allclose((half[0, 0, 0] + 1) / 2 * 255, torch.arange(8, 256, 32).float(), atol=1e-4)
    assert np.array_equal(video_to_frames(same), frames)


def test_compose_split_round_trip():
    parts = {c.key: torch.randn(1, 48, 2, c.height // 16, c.width // 16) for c in ROBOTWIN.cameras}
    layout = compose_layout(parts, ROBOTWIN)
    assert layout.shape == (1, 48, 2, 24, 20)
    back = split_layout(layout, ROBOTWIN)
    assert all(torch.equal(back[k], parts[k]) for k in parts)
    with pytest.raises(ValueError, match="\\(24, 20\\)"):
        split_layout(layout[..., :10], ROBOTWIN)


def test_decode_per_camera_and_mosaic(vae, robotwin_run):
    _, enc, first, second = robotwin_run
    latent = torch.cat([first, second], dim=2)
    videos = enc.decode(latent)
    assert {k: v.shape for k, v in videos.items()} == {c.key: (5, c.height, c.width, 3) for c in ROBOTWIN.cameras}
    assert all(v.dtype == np.uint8 for v in videos.values())
    high, left, right = (c.key for c in ROBOTWIN.cameras)
    # Decoding is causal, so the first video frame depends on the first latent frame only.
    for key, block in ((high, first[..., 8:, :]), (left, first[..., :8, :10]), (right, first[..., :8, 10:])):
        alone = video_to_frames(decode(vae, block)[0])  # wrists decode as one batch: rounding may differ
        assert alone.shape[0] == 1
        assert np.abs(videos[key][:1].astype(np.int16) - alone).max() <= 1
    mosaic = enc.decode_mosaic(first)
    assert mosaic.shape == (1, 384, 320, 3) and mosaic.dtype == np.uint8
    assert mosaic.std() > 1
    with pytest.raises(ValueError, match="one layout latent"):
        enc.decode(torch.cat([latent, latent]))


def test_bad_observations_are_named(vae):
    enc = ObservationEncoder(vae, TINY)
    key = TINY.cameras[0].key
    with pytest.raises(KeyError, match=key):
        enc.encode({"observation.images.other": np.zeros((1, 64, 96, 3), np.uint8)})
    with pytest.raises(ValueError, match=f"camera '{key}': expected uint8 \\[T, H, W, 3\\], got float32"):
        enc.encode({key: np.zeros((1, 64, 96, 3), np.float32)})
    with pytest.raises(ValueError, match="got uint8 \\(64, 96, 3\\)"):
        enc.encode({key: np.zeros((64, 96, 3), np.uint8)})
    two = LIBERO.cameras
    with pytest.raises(ValueError, match="different frame counts \\[1, 5\\]"):
        ObservationEncoder(vae, LIBERO).encode({two[0].key: np.zeros((1, 128, 128, 3), np.uint8),
                                                two[1].key: np.zeros((5, 128, 128, 3), np.uint8)})


def test_invalid_layouts_are_rejected(vae):
    bad_wrist = ROBOTWIN.replace(cameras=ROBOTWIN.cameras[:2] + (Camera("observation.images.x", 64, 80),))
    with pytest.raises(ValueError, match="wrist cameras at half its size"):
        ObservationEncoder(vae, bad_wrist)
    mixed = LIBERO.replace(cameras=(LIBERO.cameras[0], Camera("observation.images.x", 64, 64)))
    with pytest.raises(ValueError, match="cameras of one size"):
        ObservationEncoder(vae, mixed)
    odd = TINY.replace(cameras=(Camera("observation.images.x", 60, 96),))
    with pytest.raises(ValueError, match="60x96 is not a multiple"):
        ObservationEncoder(vae, odd)


def test_the_served_gpu_vae_encodes_in_bf16_compiled_close_to_fp32():
    """models/vae.py `serve_on_gpu` (what a GPU server does to its VAE), here on the CPU: bf16 weights, the 3D
    convolutions channels-last, the encoder compiled; an episode's streamed observations (the first image,
    then pieces of 4 frames, then again after a reset) come out within bf16's distance of the fp32 VAE's."""
    from vaops.models.vae import serve_on_gpu

    # dynamo traces the encoder and its cache as on the GPU; backend "eager": no inductor C++ builds (a
    # minute here), and "aot_eager" gives NaN on a CPU with channels-last 3D weights
    reference, served = build_vae(TINY_VAE, seed=0), serve_on_gpu(build_vae(TINY_VAE, seed=0), backend="eager")
    assert all(p.dtype == torch.bfloat16 for p in served.parameters())
    convs = [m for m in served.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs)
    assert served.encoder._compiled_call_impl is not None and reference.encoder._compiled_call_impl is None
    frames = _frames(TINY, 9, seed=2, size=(48, 64))
    latents = {}
    for name, vae in (("fp32", reference), ("served", served)):
        enc = ObservationEncoder(vae, TINY)
        parts = []
        for _ in range(2):  # a second episode after a reset: the compiled encoder's other cache state again
            enc.reset()
            parts = [enc.encode({k: v[:1] for k, v in frames.items()}),
                     enc.encode({k: v[1:5] for k, v in frames.items()}),
                     enc.encode({k: v[5:] for k, v in frames.items()})]
        latents[name] = torch.cat(parts, dim=2).float()
    assert latents["served"].shape == latents["fp32"].shape == (1, 48, 3, *TINY.latent_hw)
    rel = ((latents["served"] - latents["fp32"]).norm() / latents["fp32"].norm()).item()
    assert 0 < rel < 3e-2  # bf16 (the H200's robotwin encode: 6.3e-3), and not the fp32 path itself
