"""Checkpoint folders: the released diffusers layout plus `policy.json`.

```
transformer/   config.json + diffusion_pytorch_model.safetensors (released names)
vae/           AutoencoderKLWan (diffusers save_pretrained)
text_encoder/  UMT5EncoderModel (transformers save_pretrained)
tokenizer/     T5 tokenizer
policy.json    preset name, cameras and sizes, channel map, norm statistics, sampling settings
```
A checkpoint alone is enough to serve: `load_policy(folder)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from .atomic import read_json, write_folder_atomically
from .config import Camera, Preset, SamplingConfig, TransformerConfig, get_preset
from .policy import Policy, PolicyWeights
from .text_encoder import TextEncoder, build_text_encoder, load_text_encoder
from .transformer import LingBotVATransformer, build_transformer, load_transformer, save_transformer
from .vae import build_vae, load_vae, save_vae

POLICY_FILE = "policy.json"
POLICY_FORMAT = 1


def policy_dict(preset: Preset) -> dict:
    return {
        "format": POLICY_FORMAT,
        "preset": preset.name,
        "cameras": [dataclasses.asdict(c) for c in preset.cameras],
        "layout": preset.layout,
        "used_action_channels": list(preset.used_action_channels),
        "norm_stats": {"q01": list(preset.norm_q01), "q99": list(preset.norm_q99)},
        "sampling": dataclasses.asdict(preset.sampling),
        "frame_chunk_size": preset.frame_chunk_size,
        "action_per_frame": preset.action_per_frame,
        "frames_per_latent": preset.frames_per_latent,
        "fps": preset.fps,
    }


def preset_from_policy(raw: dict, transformer: TransformerConfig, source: str) -> Preset:
    """Rebuild the preset a checkpoint was trained with from its policy.json."""

    def need(key: str):
        if key not in raw:
            raise ValueError(f"{source}: field {key!r} is missing")
        return raw[key]

    try:
        base = get_preset(need("preset"))
        cameras = tuple(Camera(**c) for c in need("cameras"))
        sampling = SamplingConfig(**need("sampling"))
        norm = need("norm_stats")
        q01, q99 = tuple(float(x) for x in norm["q01"]), tuple(float(x) for x in norm["q99"])
    except (TypeError, KeyError) as e:
        raise ValueError(f"{source}: malformed field ({e})") from None
    dim = transformer.action_dim
    if len(q01) != dim or len(q99) != dim:
        raise ValueError(f"{source}: norm_stats q01/q99 must have {dim} entries, got {len(q01)}/{len(q99)}")
    channels = tuple(int(c) for c in need("used_action_channels"))
    bad = [c for c in channels if not 0 <= c < dim]
    if bad:
        raise ValueError(f"{source}: used_action_channels out of range 0..{dim - 1}: {bad}")
    layout = need("layout")
    if layout not in ("tshape", "side_by_side"):
        raise ValueError(f"{source}: layout must be 'tshape' or 'side_by_side', got {layout!r}")
    return base.replace(
        transformer=transformer, cameras=cameras, layout=layout, used_action_channels=channels,
        norm_q01=q01, norm_q99=q99, sampling=sampling,
        frame_chunk_size=int(raw.get("frame_chunk_size", base.frame_chunk_size)),
        action_per_frame=int(raw.get("action_per_frame", base.action_per_frame)),
        frames_per_latent=int(raw.get("frames_per_latent", base.frames_per_latent)),
        fps=int(raw.get("fps", base.fps)),
    )


def read_preset(folder: str | os.PathLike) -> Preset:
    folder = Path(folder)
    path = folder / POLICY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: policy.json is missing (not a vaops checkpoint folder?)")
    raw = read_json(path, "policy.json")
    transformer = TransformerConfig.from_file(folder / "transformer" / "config.json")
    return preset_from_policy(raw, transformer, str(path))


def save_checkpoint(folder: str | os.PathLike, preset: Preset, transformer: LingBotVATransformer,
                    vae: torch.nn.Module, text_encoder: TextEncoder, max_shard_bytes: int | None = None) -> Path:
    """Write a complete checkpoint folder atomically (a temp folder renamed into place); the
    transformer in shards of `max_shard_bytes` when given (the released layout)."""

    def write(tmp: Path) -> None:
        save_transformer(transformer, tmp / "transformer", max_shard_bytes)
        save_vae(vae, tmp / "vae")
        text_encoder.save(tmp / "text_encoder", tmp / "tokenizer")
        (tmp / POLICY_FILE).write_text(json.dumps(policy_dict(preset), indent=2) + "\n")

    return write_folder_atomically(folder, write)


def load_weights(folder: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, backend: str | None = None) -> PolicyWeights:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: checkpoint folder does not exist")
    preset = read_preset(folder)
    transformer = load_transformer(folder / "transformer", dtype=dtype, device=device)
    vae = load_vae(folder / "vae", dtype=torch.float32, device=device)
    text = load_text_encoder(folder / "text_encoder", folder / "tokenizer", dtype=torch.float32, device=device)
    return PolicyWeights(preset, transformer, vae, text, backend)


def load_policy(folder: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, backend: str | None = None) -> Policy:
    return load_weights(folder, device, dtype, backend).new_policy()


def build_random_weights(preset: Preset, seed: int = 0, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> PolicyWeights:
    """Random networks of the preset's sizes (tests, the demo, benchmarks)."""
    transformer = build_transformer(preset.transformer, seed=seed, device=device, dtype=dtype)
    vae = build_vae(preset.vae, seed=seed).to(device)
    text = build_text_encoder(preset.text_encoder, seed=seed)
    text.model.to(device)
    return PolicyWeights(preset, transformer.eval(), vae.eval(), text)


# Presets trained from random weights (no released checkpoint): the pipeline's base-model step may
# start them without a base checkpoint.
RANDOM_INIT_PRESETS = ("tiny", "small")


def write_random_checkpoint(folder: str | os.PathLike, preset: Preset | str, seed: int | None = None,
                            device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                            max_shard_bytes: int | None = None) -> Path:
    """A complete random checkpoint of `preset`'s sizes in the released layout: the transformer and
    text encoder built on `device` in `dtype` (bfloat16 on a GPU makes the real sizes take seconds
    and half the disk), the VAE in float32 as released. The parts are built and written one at a
    time, so the real sizes need one network's memory at a time."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    seed = preset.init_seed if seed is None else seed

    def write(tmp: Path) -> None:
        transformer = build_transformer(preset.transformer, seed=seed, device=device, dtype=dtype)
        save_transformer(transformer, tmp / "transformer", max_shard_bytes)
        del transformer
        save_vae(build_vae(preset.vae, seed=seed), tmp / "vae")
        text = build_text_encoder(preset.text_encoder, seed=seed, device=device, dtype=dtype)
        text.save(tmp / "text_encoder", tmp / "tokenizer")
        del text
        (tmp / POLICY_FILE).write_text(json.dumps(policy_dict(preset), indent=2) + "\n")

    return write_folder_atomically(folder, write)


def write_tiny_checkpoint(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A complete tiny random checkpoint (the `tiny` preset) for tests and the demo."""
    return write_random_checkpoint(folder, get_preset("tiny"), seed=seed)
