"""Checkpoint folders: the released diffusers layout plus `policy.json`.

```
transformer/   config.json + diffusion_pytorch_model.safetensors (released names)
vae/           AutoencoderKLWan (diffusers save_pretrained)
text_encoder/  UMT5EncoderModel (transformers save_pretrained)
tokenizer/     T5 tokenizer
policy.json    preset name, cameras and sizes, channel map, norm statistics, sampling settings
```
A checkpoint alone is enough to serve: `load_policy(folder)`.

A shipped policy (`ship_checkpoint`) is the transformer and policy.json of a checkpoint whose VAE
and text encoder are a preset's random weights: `shipped.json` records how to rebuild them and the
sha256 of every weights file, `lineage.json` how the policy was made. `materialize_shipped` (which
`model_source.resolve_checkpoint` calls) turns it back into a complete checkpoint folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .atomic import link_or_copy, read_json, write_folder_atomically
from .codec import ConfigError, decode, encode
from .config import Camera, Preset, SamplingConfig, TransformerConfig, check_operating_point, get_preset
from .model_source import SHIPPED_FILE
from .policy import Policy, PolicyWeights
from .text_encoder import TextEncoder, build_text_encoder, load_text_encoder
from .transformer import (
    WEIGHTS_NAME,
    LingBotVATransformer,
    build_transformer,
    load_transformer,
    save_transformer,
    write_unsharded,
)
from .vae import build_vae, load_vae, save_vae

POLICY_FILE = "policy.json"
POLICY_FORMAT = 1


@dataclass(frozen=True)
class NormStats:
    q01: tuple[float, ...]
    q99: tuple[float, ...]


@dataclass(frozen=True, kw_only=True)
class PolicyFile:
    """policy.json, field for field: the preset's name and what a checkpoint may change of it. The
    transformer's sizes are its config.json, the VAE's and text encoder's the named preset's."""

    format: int = POLICY_FORMAT
    preset: str
    cameras: tuple[Camera, ...]
    layout: Literal["tshape", "side_by_side"]
    used_action_channels: tuple[int, ...]
    norm_stats: NormStats
    sampling: SamplingConfig
    operating_points: dict[str, SamplingConfig] = field(default_factory=dict)
    # None (files written before they were recorded): the named preset's
    frame_chunk_size: int | None = None
    action_per_frame: int | None = None
    frames_per_latent: int | None = None
    fps: int | None = None
    control_fps: int | None = None  # null: any dataset rate


def policy_dict(preset: Preset) -> dict:
    return encode(PolicyFile(
        preset=preset.name, cameras=preset.cameras, layout=preset.layout,
        used_action_channels=preset.used_action_channels, norm_stats=NormStats(preset.norm_q01, preset.norm_q99),
        sampling=preset.sampling, operating_points=preset.operating_point_settings(),
        frame_chunk_size=preset.frame_chunk_size, action_per_frame=preset.action_per_frame,
        frames_per_latent=preset.frames_per_latent, fps=preset.fps, control_fps=preset.control_fps))


def preset_from_policy(raw: dict, transformer: TransformerConfig, source: str) -> Preset:
    """Rebuild the preset a checkpoint was trained with from its policy.json."""
    policy = decode(PolicyFile, raw, source)
    try:
        base = get_preset(policy.preset)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    dim = transformer.action_dim
    norm = policy.norm_stats
    if len(norm.q01) != dim or len(norm.q99) != dim:
        raise ConfigError(f"{source}: norm_stats q01/q99 must have {dim} entries, got {len(norm.q01)}/{len(norm.q99)}")
    bad = [c for c in policy.used_action_channels if not 0 <= c < dim]
    if bad:
        raise ConfigError(f"{source}: used_action_channels out of range 0..{dim - 1}: {bad}")
    for name, point in policy.operating_points.items():
        try:
            check_operating_point(name, point, policy.sampling)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    # None (absent, files written before they were recorded): the base preset's; control_fps null: any rate
    sizes = {k: v for k in ("frame_chunk_size", "action_per_frame", "frames_per_latent", "fps")
             if (v := getattr(policy, k)) is not None}
    return base.replace(
        transformer=transformer, cameras=policy.cameras, layout=policy.layout,
        used_action_channels=policy.used_action_channels, norm_q01=norm.q01, norm_q99=norm.q99,
        control_fps=policy.control_fps if "control_fps" in raw else base.control_fps, **sizes,
        sampling=policy.sampling, operating_points=tuple(policy.operating_points.items()))


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


# ----- shipped policies: the trained transformer without the encoders it can rebuild -----

SHIPPED_FORMAT = 1
LINEAGE_FILE = "lineage.json"
# The encoders' weights files, rebuilt from the preset's seed when a shipped policy is materialized.
ENCODER_WEIGHTS = ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")
TRANSFORMER_WEIGHTS = f"transformer/{WEIGHTS_NAME}"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_encoders(folder: Path, preset: Preset, seed: int, latents_mean: list, latents_std: list) -> dict[str, str]:
    """The preset's random VAE and text encoder at `seed` (as `write_random_checkpoint` builds them),
    the VAE with the given latent statistics, into `folder`; returns their weights files' sha256."""
    vae = build_vae(preset.vae, seed=seed)
    vae.register_to_config(latents_mean=list(latents_mean), latents_std=list(latents_std))
    save_vae(vae, folder / "vae")
    build_text_encoder(preset.text_encoder, seed=seed).save(folder / "text_encoder", folder / "tokenizer")
    return {name: file_sha256(folder / name) for name in ENCODER_WEIGHTS}


def _differing(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    return sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))


def ship_checkpoint(checkpoint: str | os.PathLike, dest: str | os.PathLike, lineage: dict,
                    seed: int | None = None) -> Path:
    """`checkpoint` as a folder small enough to ship with the code: the transformer (one weights file,
    every tensor as trained) and policy.json, plus `shipped.json` (what rebuilds the VAE and text
    encoder it leaves out: the preset, the seed of their random weights (None: the preset's), the
    VAE's latent statistics; the sha256 of every weights file) and `lineage.json` (`lineage`: the
    commands, code and data that made it). Refused when the checkpoint's encoders are not the
    preset's random ones at that seed: they could not be rebuilt."""
    src = Path(checkpoint)
    preset = read_preset(src)
    seed = preset.init_seed if seed is None else seed
    vae_config = read_json(src / "vae" / "config.json", "VAE config.json")
    stats = {k: vae_config[k] for k in ("latents_mean", "latents_std")}
    expected = {name: file_sha256(src / name) for name in ENCODER_WEIGHTS}

    def write(tmp: Path) -> None:
        rebuilt = _write_encoders(tmp / "encoders", preset, seed, **stats)
        differ = _differing(expected, rebuilt)
        if differ:
            raise ValueError(f"{src}: {', '.join(differ)} are not the {preset.name!r} preset's random weights at "
                             f"seed {seed}, so they cannot be rebuilt; ship the whole checkpoint folder")
        shutil.rmtree(tmp / "encoders")
        write_unsharded(src / "transformer", tmp / "transformer")
        shutil.copyfile(src / POLICY_FILE, tmp / POLICY_FILE)
        record = {"format": SHIPPED_FORMAT, "preset": preset.name, "encoder_seed": seed, "vae": stats,
                  "sha256": {TRANSFORMER_WEIGHTS: file_sha256(tmp / TRANSFORMER_WEIGHTS), **expected}}
        (tmp / SHIPPED_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")

    return write_folder_atomically(dest, write)


def read_shipped(folder: str | os.PathLike) -> dict:
    """A shipped policy's `shipped.json`, its fields checked."""
    path = Path(folder) / SHIPPED_FILE
    record = read_json(path, "shipped.json")
    if not isinstance(record, dict) or record.get("format") != SHIPPED_FORMAT:
        raise ValueError(f"{path}: not a format-{SHIPPED_FORMAT} shipped policy record")
    vae, hashes = record.get("vae"), record.get("sha256")
    bad = [k for k, kind in (("preset", str), ("encoder_seed", int), ("vae", dict), ("sha256", dict))
           if not isinstance(record.get(k), kind)]
    bad += [f"vae.{k}" for k in ("latents_mean", "latents_std") if isinstance(vae, dict) and not isinstance(vae.get(k), list)]
    bad += [f"sha256[{n!r}]" for n in (TRANSFORMER_WEIGHTS, *ENCODER_WEIGHTS)
            if isinstance(hashes, dict) and not isinstance(hashes.get(n), str)]
    if bad:
        raise ValueError(f"{path}: missing or malformed field(s) {', '.join(bad)}")
    return record


def materialize_shipped(shipped: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """The complete checkpoint folder of a shipped policy at `dest`: its transformer and policy.json
    linked (copied across file systems), the VAE and text encoder rebuilt from the preset's code at
    the recorded seed and latent statistics. Every weights file must match its recorded sha256: a
    rebuild that differs (the preset's encoder sizes or init changed since) or a transformer that
    is not the shipped one (a Git LFS pointer, a partial copy) stops with one line saying which."""
    shipped = Path(shipped)
    record = read_shipped(shipped)
    preset = read_preset(shipped)
    if preset.name != record["preset"]:
        raise ValueError(f"{shipped}: policy.json is a {preset.name!r} policy but {SHIPPED_FILE} records "
                         f"{record['preset']!r}")
    weights = shipped / TRANSFORMER_WEIGHTS
    if not weights.is_file() or file_sha256(weights) != record["sha256"][TRANSFORMER_WEIGHTS]:
        raise ValueError(f"{weights}: missing or not the shipped transformer (its sha256 differs from "
                         f"{SHIPPED_FILE}'s; a Git LFS pointer or a partial copy?)")
    expected = {name: record["sha256"][name] for name in ENCODER_WEIGHTS}

    def write(tmp: Path) -> None:
        stats = record["vae"]
        rebuilt = _write_encoders(tmp, preset, record["encoder_seed"], stats["latents_mean"], stats["latents_std"])
        differ = _differing(expected, rebuilt)
        if differ:
            raise ValueError(f"{shipped}: the rebuilt {', '.join(differ)} differ from the sha256 in {SHIPPED_FILE}: "
                             f"this code's {preset.name!r} preset no longer builds the encoders the policy was "
                             f"trained with (seed {record['encoder_seed']})")
        shutil.copytree(shipped / "transformer", tmp / "transformer", copy_function=link_or_copy)
        for name in (POLICY_FILE, LINEAGE_FILE):
            if (shipped / name).is_file():
                shutil.copyfile(shipped / name, tmp / name)

    return write_folder_atomically(dest, write)
