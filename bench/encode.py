"""Frames per second of the encode stage's video encoding (the VAE dominates `vaops encode`).

Rows, all measured in this run on the same random clip, ratios against the first:
  whole-clip fp32   `vae.encode(clip).latent_dist.mean` in one call (the baseline)
  streaming fp32    the encode stage's `VideoEncoder`: the causal cache, `--chunk` latent frames per call
  streaming bf16    the same in bfloat16 (CUDA only; the stage's GPU preset)
  streaming fp32, PyTorch's conv choice   (CPU only) without models/vae.py's OneDNNConv3d: a batch-1
                    3D convolution takes PyTorch's slow path below its size threshold
Every row includes the model's camera resize and latent normalisation; on CUDA the peak memory
of each row is printed too (streaming bounds it by the chunk, not the clip).

    python bench/encode.py                                   # tiny preset VAE, CPU
    python bench/encode.py --device cuda                     # the real-size Wan2.2 VAE (random weights)
    python bench/encode.py --device cuda --frames 161 --chunk 8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vaops.models.config import get_preset
from vaops.models.observation import VideoEncoder, frames_to_video
import vaops.models.vae as vae_module
from vaops.models.vae import build_vae, latent_stats, normalize_latents


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds, peak GiB) of `fn()` over `repeats` runs after one warm-up."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return float(np.median(times)), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", help="model preset (default: tiny on CPU, robotwin = real Wan2.2 VAE on CUDA)")
    p.add_argument("--frames", type=int, help="clip length, 1 + 4k (default: 33 on CPU, 81 on CUDA)")
    p.add_argument("--chunk", type=int, default=4, help="latent frames per streaming call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    preset = get_preset(args.preset or ("robotwin" if cuda else "tiny"))
    frames = args.frames or (81 if cuda else 33)
    if frames % preset.vae.scale_factor_temporal != 1:
        p.error(f"--frames must be 1 + {preset.vae.scale_factor_temporal}k, got {frames}")
    camera = preset.cameras[0]
    clip = np.random.default_rng(0).integers(0, 256, (frames, camera.height, camera.width, 3), dtype=np.uint8)
    base = build_vae(preset.vae, seed=0)
    stats = latent_stats(base)

    rows: list[dict[str, Any]] = []

    def whole(vae):
        param = next(vae.parameters())
        with torch.no_grad():
            video = frames_to_video(clip, camera.height, camera.width)[None].to(param.device, param.dtype)
            return normalize_latents(vae.encode(video).latent_dist.mean, *stats)

    vae32 = base.to(device)
    stream32 = VideoEncoder(vae32, args.chunk)
    variants: list[tuple[str, Callable[[], torch.Tensor]]] = [("whole-clip fp32", lambda: whole(vae32)),
                                                              ("streaming fp32", lambda: stream32(clip, camera))]
    if cuda:
        stream16 = VideoEncoder(build_vae(preset.vae, seed=0).to(device=device, dtype=torch.bfloat16), args.chunk)
        variants.append(("streaming bf16", lambda: stream16(clip, camera)))
    else:
        def pytorch_convs() -> torch.Tensor:
            vae_module.ONEDNN_CPU_CONV3D = False
            try:
                return stream32(clip, camera)
            finally:
                vae_module.ONEDNN_CPU_CONV3D = True

        variants.append(("streaming fp32, PyTorch's conv choice", pytorch_convs))

    print(f"encode bench: preset {preset.name} VAE (z {preset.vae.z_dim}, base {preset.vae.base_dim}), "
          f"{frames} frames of {camera.height}x{camera.width}, chunk {args.chunk}, {device}, "
          f"median of {args.repeats}")
    for name, fn in variants:
        seconds, peak = measure(fn, args.repeats, device)
        rows.append({"name": name, "seconds": seconds, "frames_per_second": frames / seconds, "peak_gib": peak})
    baseline = rows[0]["frames_per_second"]
    print(f"{'variant':<40}{'frames/s':>12}{'x baseline':>12}{'peak GiB':>10}")
    for r in rows:
        r["ratio"] = r["frames_per_second"] / baseline
        peak_text = f"{r['peak_gib']:>10.2f}" if cuda else f"{'-':>10}"
        print(f"{r['name']:<40}{r['frames_per_second']:>12.1f}{r['ratio']:>12.2f}{peak_text}")
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
