"""`vaops generate`: first-frame image(s) + prompt -> imagined video (mp4) and action chunks (npz).

The reference's image-to-video-action mode: the model imagines chunk after chunk from the first
observation alone, each imagined chunk becoming the context of the next.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vaops.models.atomic import write_file_atomically, write_text_atomically
from vaops.models.config import PRESETS, get_preset

if TYPE_CHECKING:  # torch, the model and imageio load in main(), after the arguments parse (--help stays fast)
    from vaops.models.policy import Policy


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint folder (transformer/, vae/, text_encoder/, tokenizer/, "
                                          "policy.json), or models:/<name>@<alias> | models:/<name>/<version> "
                                          "from the registry at MLFLOW_TRACKING_URI (default ./mlflow.db)")
    src.add_argument("--random-weights", choices=sorted(PRESETS), help="random weights of a preset (smoke tests, demos)")
    p.add_argument("--images", type=Path, help="folder with one <camera key>.png per camera; default: a synthetic scene")
    p.add_argument("--prompt", default="pick up the cube and hand it over")
    p.add_argument("--chunks", type=int, default=4, help="chunks to imagine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/generate"))
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def load_images(folder: Path, policy: Policy) -> dict[str, np.ndarray]:
    import imageio.v2 as imageio

    images = {}
    for cam in policy.preset.cameras:
        path = folder / f"{cam.key}.png"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image for camera {cam.key!r} is missing")
        img = imageio.imread(path)
        if img.ndim != 3 or img.shape[2] not in (3, 4):
            raise ValueError(f"{path}: expected an RGB image, got shape {img.shape}")
        images[cam.key] = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    return images


def synthetic_images(policy: Policy, seed: int) -> dict[str, np.ndarray]:
    """A table-top-like scene: a gradient background with a coloured block, one per camera."""
    rng = np.random.default_rng(seed)
    out = {}
    for cam in policy.preset.cameras:
        y, x = np.mgrid[0:cam.height, 0:cam.width]
        img = np.stack([60 + 100 * y / cam.height, 80 + 60 * x / cam.width, 90 + 0 * x], axis=-1)
        cy, cx = rng.integers(cam.height // 4, 3 * cam.height // 4), rng.integers(cam.width // 4, 3 * cam.width // 4)
        s = max(2, cam.height // 8)
        img[cy - s:cy + s, cx - s:cx + s] = (220, 40, 40)
        out[cam.key] = img.astype(np.uint8)
    return out


def generate(policy: Policy, images: dict[str, np.ndarray], prompt: str, chunks: int, seed: int):
    """Returns (video uint8 [T, H, W, 3], actions [chunks, n_used, FC, N])."""
    import torch
    from tqdm import tqdm

    policy.reset(prompt, seed=seed)
    latents, actions = [], []
    for c in tqdm(range(chunks), desc="imagining chunks", unit="chunk"):
        chunk = policy.act(images if c == 0 else None)
        latents.append(chunk.latents)
        actions.append(chunk.actions)
        policy.engine.advance()
    return policy.imagine(torch.cat(latents, dim=2)), np.stack(actions)


def write_outputs(out: Path, video: np.ndarray, actions: np.ndarray, policy: Policy, prompt: str) -> None:
    import imageio.v2 as imageio

    write_file_atomically(out / "video.mp4",
                          lambda tmp: imageio.mimwrite(tmp, list(video), fps=policy.preset.fps, macro_block_size=1))
    write_file_atomically(out / "actions.npz", lambda tmp: np.savez(
        tmp, actions=actions, used_action_channels=np.array(policy.preset.used_action_channels)))
    write_text_atomically(out / "meta.json", json.dumps({
        "prompt": prompt, "preset": policy.preset.name, "chunks": int(actions.shape[0]),
        "video_frames": int(video.shape[0]), "actions_shape": list(actions.shape),
        "actions_layout": "[chunk, used channel, latent frame, action step]"}, indent=2))


def main(args: argparse.Namespace) -> int:
    import torch

    from vaops.models.checkpoint import build_random_weights, load_weights
    from vaops.models.model_source import resolve_checkpoint

    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.checkpoint:
        # A registry version is downloaded once into the model cache, as `vaops serve` does.
        weights = load_weights(resolve_checkpoint(args.checkpoint), device=device, dtype=dtype)
    else:
        weights = build_random_weights(get_preset(args.random_weights), seed=args.seed, device=device, dtype=dtype)
    policy = weights.new_policy()
    images = load_images(args.images, policy) if args.images else synthetic_images(policy, args.seed)
    video, actions = generate(policy, images, args.prompt, args.chunks, args.seed)
    write_outputs(args.out, video, actions, policy, args.prompt)
    print(f"imagined video: {args.out / 'video.mp4'} ({video.shape[0]} frames)")
    print(f"actions:        {args.out / 'actions.npz'} {list(actions.shape)} {'[chunk, channel, frame, step]'}")
    return 0
