"""Encode a dataset into the released post-training layout (MODEL.md, "Post-training data layout").

The output is the dataset (files hard-linked or copied) plus, for every `action_config` segment
(or the whole episode when it has none) and every camera of the preset:

    latents/chunk-XXX/<camera key>/episode_XXXXXX_<start>_<end>.pth
        latent [f*h*w, C] bf16 (normalised VAE means, (f, h, w) order), latent_num_frames,
        latent_height, latent_width, video_num_frames, video_height, video_width,
        text_emb [L, D] bf16, text, frame_ids, start_frame, end_frame, fps, ori_fps
    empty_emb.pt           the empty prompt's embedding [L, D] bf16
    meta/norm_stats.json   {"q01": [30], "q99": [30], ...} over the segments' model-channel actions

Frames are sampled every `stride` frames from the segment start (`fps = ori_fps / stride`) and
cut to `1 + 4k` so that each latent frame after the first spans 4 sampled frames; segments too
short for two latent frames are skipped and reported.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vaops.components.dataset import DatasetError, LeRobotData, Segment
from vaops.components.reports import markdown_table, write_report
from vaops.models.atomic import link_or_copy, write_folder_atomically
from vaops.models.checkpoint import POLICY_FILE, read_preset
from vaops.models.config import Preset, get_preset
from vaops.models.observation import VideoEncoder
from vaops.models.text_encoder import TextEncoder, build_text_encoder, load_text_encoder
from vaops.models.vae import (
    build_vae,
    load_vae,
)

from .adapter import get_robot, quantile_stats, to_model_channels
from .config import EncodeConfig
from .layout import EMPTY_EMB_FILE, LATENTS_DIR, NORM_STATS_FILE, latent_path

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sample_frame_ids(start: int, end: int, stride: int, frames_per_latent: int) -> list[int]:
    """Every `stride`-th frame of `[start, end)`, cut to `1 + frames_per_latent * k` (k >= 1);
    empty when the segment is too short."""
    ids = list(range(start, end, stride))
    k = (len(ids) - 1) // frames_per_latent if ids else 0
    return ids[:1 + frames_per_latent * k] if k >= 1 else []


def load_models(cfg: EncodeConfig, preset: Preset):
    dtype = _DTYPES.get(cfg.dtype)
    if dtype is None:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {cfg.dtype!r}")
    if cfg.checkpoint is None:
        vae = build_vae(preset.vae, seed=cfg.seed)
        text = build_text_encoder(preset.text_encoder, seed=cfg.seed)
    else:
        root = Path(cfg.checkpoint)
        vae = load_vae(root / "vae", dtype=dtype, device=cfg.device)
        text = load_text_encoder(root / "text_encoder", root / "tokenizer", dtype=dtype, device=cfg.device,
                                 max_length=preset.text_encoder.max_length)
    vae = vae.to(device=cfg.device, dtype=dtype)
    text.model.to(device=cfg.device, dtype=dtype)
    return vae, text



@dataclass
class EncodeResult:
    output: Path
    segments: int
    files: int
    skipped: list[dict] = field(default_factory=list)
    frames_encoded: int = 0
    encode_seconds: float = 0.0

    @property
    def frames_per_second(self) -> float:
        return self.frames_encoded / self.encode_seconds if self.encode_seconds else 0.0


def _segments(meta) -> list[Segment]:
    return meta.action_config or [Segment(0, meta.length, meta.tasks[0] if meta.tasks else "")]


def encoding_preset(cfg: EncodeConfig) -> Preset:
    """The cameras and sizes to encode for: a checkpoint's policy.json wins over the named preset (as
    in training), so the latents fit the model that will train on them."""
    if cfg.checkpoint is not None and (Path(cfg.checkpoint) / POLICY_FILE).is_file():
        return read_preset(cfg.checkpoint)
    return get_preset(cfg.model_preset)


def run(cfg: EncodeConfig) -> EncodeResult:
    preset = encoding_preset(cfg)
    robot = get_robot(cfg.robot)
    per_latent = preset.frames_per_latent
    stride = cfg.stride or preset.action_per_frame // per_latent
    if cfg.stride is None and preset.action_per_frame % per_latent:
        raise ValueError(f"preset {preset.name!r}: {preset.action_per_frame} actions per latent frame is not a "
                         f"multiple of {per_latent} frames; give --stride")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    data = LeRobotData(cfg.dataset)
    missing = [c.key for c in preset.cameras if c.key not in data.video_keys]
    if missing:
        raise DatasetError(f"{cfg.dataset}: preset {preset.name!r} needs cameras {missing}; the dataset has "
                           f"{data.video_keys}")
    width = tuple(data.features.get("action", {}).get("shape", ()))
    if width != (robot.width,):
        raise DatasetError(f"{data.root / 'meta' / 'info.json'}: action shape {list(width)}, robot "
                           f"{robot.name!r} records {robot.width} values")
    if preset.control_fps is not None and data.fps != preset.control_fps:
        raise DatasetError(f"{data.root / 'meta' / 'info.json'}: fps {data.fps}, preset {preset.name!r} runs its "
                           f"robot at {preset.control_fps} actions/s")
    vae, text_encoder = load_models(cfg, preset)
    encoder = VideoEncoder(vae, cfg.chunk_latent_frames)
    chunks_size = int(data.info.get("chunks_size", 1000))
    ori_fps = data.fps
    fps = ori_fps / stride if ori_fps % stride else ori_fps // stride
    result = EncodeResult(Path(cfg.output), 0, 0)
    texts: dict[str, torch.Tensor] = {}

    def text_emb(text: str) -> torch.Tensor:
        if text not in texts:
            texts[text] = _embed(text_encoder, text)
        return texts[text]

    def build(tmp: Path) -> None:
        shutil.copytree(data.root, tmp, dirs_exist_ok=True,
                        copy_function=link_or_copy if cfg.link_files else shutil.copy2)
        # an already encoded input is re-encoded from scratch
        shutil.rmtree(tmp / LATENTS_DIR, ignore_errors=True)
        for stale in (EMPTY_EMB_FILE, NORM_STATS_FILE):
            (tmp / stale).unlink(missing_ok=True)
        model_actions = []
        todo = [(m, s) for m in data.episodes for s in _segments(m)]
        videos: dict[str, np.ndarray] = {}
        current = None
        for meta, seg in tqdm(todo, desc="encode segments", unit="seg"):
            ep = meta.episode_index
            ids = sample_frame_ids(seg.start_frame, seg.end_frame, stride, per_latent)
            if not ids:
                result.skipped.append({"episode_index": ep, "start_frame": seg.start_frame,
                                       "end_frame": seg.end_frame,
                                       "reason": f"fewer than {1 + per_latent} frames at stride {stride}"})
                continue
            if current != ep:
                current = ep
                actions = data.arrays(ep)["action"]
                videos = {c.key: data.video(ep, c.key) for c in preset.cameras}
            model_actions.append(to_model_channels(actions[seg.start_frame:seg.end_frame], robot))
            emb = text_emb(seg.action_text)
            for cam in preset.cameras:
                t0 = time.perf_counter()
                latent = encoder(videos[cam.key][ids], cam)
                result.encode_seconds += time.perf_counter() - t0
                result.frames_encoded += len(ids)
                c, f, h, w = latent.shape
                record = {
                    "latent": latent.permute(1, 2, 3, 0).reshape(f * h * w, c).to(torch.bfloat16).cpu(),
                    "latent_num_frames": f, "latent_height": h, "latent_width": w,
                    "video_num_frames": len(ids), "video_height": cam.height, "video_width": cam.width,
                    "text_emb": emb, "text": seg.action_text, "frame_ids": ids,
                    "start_frame": seg.start_frame, "end_frame": seg.end_frame, "fps": fps, "ori_fps": ori_fps,
                }
                path = latent_path(tmp, chunks_size, cam.key, ep, seg.start_frame, seg.end_frame)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(record, path)
                result.files += 1
            result.segments += 1
        if not model_actions:
            raise DatasetError(f"{cfg.dataset}: no segment is long enough to encode at stride {stride}")
        (tmp / NORM_STATS_FILE).write_text(json.dumps(quantile_stats(model_actions, robot), indent=2) + "\n")
        torch.save(_embed(text_encoder, ""), tmp / EMPTY_EMB_FILE)

    write_folder_atomically(cfg.output, build)
    write_report(cfg.report_dir, _report(cfg, result, stride, fps), _markdown(cfg, result, stride, fps))
    return result


def _embed(text_encoder: TextEncoder, text: str) -> torch.Tensor:
    return text_encoder.encode([text])[0].to(torch.bfloat16).cpu()


def _report(cfg: EncodeConfig, r: EncodeResult, stride: int, fps) -> dict:
    return {"dataset": cfg.dataset, "output": cfg.output, "preset": cfg.model_preset, "robot": cfg.robot,
            "checkpoint": cfg.checkpoint, "stride": stride, "fps": fps, "segments": r.segments,
            "latent_files": r.files, "skipped": r.skipped, "frames_encoded": r.frames_encoded,
            "encode_seconds": round(r.encode_seconds, 3), "frames_per_second": round(r.frames_per_second, 2)}


def _markdown(cfg: EncodeConfig, r: EncodeResult, stride: int, fps) -> str:
    out = (f"# Encoding of `{cfg.dataset}`\n\n{r.segments} segments -> {r.files} latent files in `{cfg.output}` "
           f"(preset {cfg.model_preset}, robot {cfg.robot}, stride {stride}, {fps} fps); "
           f"{r.frames_encoded} frames at {r.frames_per_second:.1f} frames/s.\n")
    if r.skipped:
        out += "\n## Skipped segments\n\n" + markdown_table(
            ["episode", "start", "end", "reason"],
            [[s["episode_index"], s["start_frame"], s["end_frame"], s["reason"]] for s in r.skipped])
    return out
