"""A small random latent dataset in the released post-training layout (see data.py).

For tests, smoke runs and demos of the trainer without the encode stage: latents with some
structure (a per-episode pattern drifting over frames), smooth actions in the preset's used
channels, per-segment text embeddings, the empty-prompt embedding and quantile statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vaops.components.encode.adapter import ROBOTS, quantile_stats, to_model_channels
from vaops.components.encode.layout import EMPTY_EMB_FILE, NORM_STATS_FILE, latent_path
from vaops.models.atomic import write_folder_atomically
from vaops.models.config import Preset

from .data import robot_adapter


def write_synthetic_latent_dataset(root: str | Path, preset: Preset, episodes: int = 4, latent_frames: int = 4,
                                   segments_per_episode: int = 1, text_tokens: int = 7, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_folder_atomically(root, lambda tmp: _write(tmp, preset, rng, episodes, latent_frames,
                                                            segments_per_episode, text_tokens))


def _write(tmp: Path, preset: Preset, rng: np.random.Generator, episodes: int, latent_frames: int,
           segments_per_episode: int, text_tokens: int) -> None:
    cfg = preset.transformer
    stride = preset.action_per_frame // preset.frames_per_latent
    seg_len = (latent_frames - 1) * preset.frames_per_latent * stride + 1
    # the recorded rate: the robot's control rate where the preset fixes one (the ALOHA sim's 10 Hz)
    ori_fps = preset.control_fps or preset.fps * stride
    length = segments_per_episode * seg_len + stride
    used = list(preset.used_action_channels)
    robot = robot_adapter({}, preset, "synthetic")
    s = preset.vae.scale_factor_spatial
    (tmp / "meta").mkdir(parents=True)
    (tmp / "data" / "chunk-000").mkdir(parents=True)

    rows, all_actions = [], []
    for ep in range(episodes):
        t = np.arange(length)[:, None] / length
        phase, freq = rng.uniform(0, 2 * np.pi, len(used)), rng.uniform(0.5, 2.0, len(used))
        actions = 0.5 * np.sin(2 * np.pi * freq * t + phase)
        for group in robot.eef_poses:
            quat = np.stack([np.sin(t[:, 0]), np.zeros(length), np.zeros(length), np.cos(t[:, 0])], axis=1)
            actions[:, list(group)] = np.concatenate([actions[:, list(group[:3])], quat], axis=1)
        actions = actions.astype(np.float32)
        table = pa.table({
            "episode_index": np.full(length, ep, dtype=np.int64),
            "frame_index": np.arange(length, dtype=np.int64),
            "index": np.arange(ep * length, (ep + 1) * length, dtype=np.int64),
            "timestamp": (np.arange(length) / ori_fps).astype(np.float32),
            "action": pa.array(list(actions), type=pa.list_(pa.float32())),
        })
        pq.write_table(table, tmp / "data" / "chunk-000" / f"episode_{ep:06d}.parquet")

        segments = []
        pattern = {c.key: rng.standard_normal((cfg.in_channels, c.height // s, c.width // s)) for c in preset.cameras}
        drift = {c.key: rng.standard_normal((cfg.in_channels, c.height // s, c.width // s)) for c in preset.cameras}
        for k in range(segments_per_episode):
            start, end = k * seg_len, (k + 1) * seg_len
            frame_ids = list(range(start, end, stride))
            text = f"episode {ep} segment {k}"
            text_emb = torch.from_numpy(rng.standard_normal((text_tokens, cfg.text_dim))).to(torch.bfloat16)
            segments.append({"start_frame": start, "end_frame": end, "action_text": text})
            seg = actions[frame_ids[0]:frame_ids[0] + (latent_frames - 1) * preset.action_per_frame]
            all_actions.append(to_model_channels(seg, robot))
            for cam in preset.cameras:
                f = np.arange(latent_frames)[:, None, None, None] / latent_frames
                lat = pattern[cam.key][None] + f * drift[cam.key][None] + 0.1 * rng.standard_normal(
                    (latent_frames, *pattern[cam.key].shape))
                lat = torch.from_numpy(lat).permute(0, 2, 3, 1).reshape(-1, cfg.in_channels).to(torch.bfloat16)
                path = latent_path(tmp, 1000, cam.key, ep, start, end)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"latent": lat, "latent_num_frames": latent_frames, "latent_height": cam.height // s,
                            "latent_width": cam.width // s, "video_num_frames": len(frame_ids),
                            "video_height": cam.height, "video_width": cam.width, "text_emb": text_emb,
                            "text": text, "frame_ids": frame_ids, "start_frame": start, "end_frame": end,
                            "fps": ori_fps / stride, "ori_fps": ori_fps}, path)
        rows.append({"episode_index": ep, "tasks": ["synthetic"], "length": length, "action_config": segments})

    stats = quantile_stats(all_actions, robot)
    if robot.name not in ROBOTS:
        del stats["robot"]
    (tmp / NORM_STATS_FILE).write_text(json.dumps(stats))
    (tmp / "meta" / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "meta" / "info.json").write_text(json.dumps({
        "codebase_version": "v2.1", "fps": ori_fps, "chunks_size": 1000, "total_episodes": episodes,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"}))
    torch.save(torch.from_numpy(0.1 * rng.standard_normal((text_tokens, cfg.text_dim))).to(torch.bfloat16),
               tmp / EMPTY_EMB_FILE)
