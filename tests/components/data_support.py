"""Shared data of the data-stage tests: one scripted-expert ALOHA dataset made once per test run
(across pytest-xdist workers) and copied by each test; defect planting; a v2.1 exporter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[2]
DEMO_EPISODES = 6
CAMERA = "observation.images.top"


def _make_demos(out: Path) -> Path:
    import dataclasses

    from vaops.components.demos.config import PRESETS
    from vaops.components.demos.stage import run

    run(dataclasses.replace(PRESETS["test"], output=str(out), episodes=DEMO_EPISODES))
    return out


@pytest.fixture(scope="session")
def demos_source(tmp_path_factory) -> Path:
    """The shared dataset (read-only for tests: copy it with `copy_dataset`)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the same for every xdist worker of this run
    out = shared / "vaops-demos"
    with FileLock(str(shared / "vaops-demos.lock")):
        if not (out / "meta" / "info.json").is_file():
            _make_demos(out)
    return out


def moving_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 `[n, H, W, 3]`: a textured image that drifts two pixels per frame (neither blank nor
    frozen, and smooth enough that video coding keeps it)."""
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        img = (np.sin((xx + 2 * t + 7 * seed) / 4.0) + np.cos(yy / 5.0 + seed)) * 60 + 128
        out[t] = np.stack([img, img[::-1], 255 - img], axis=-1).astype(np.uint8)
    return out


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tree_digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def plant_defects(root: Path) -> dict[int, str]:
    """Episode 1: truncated mp4; episode 2: a NaN action; episode 3: a segment past the end.
    Returns {episode: the check that must catch it}."""
    from vaops.components.dataset import LeRobotData, Segment, write_episode_metadata

    data = LeRobotData(root)
    video = data.video_file(1, CAMERA)
    video.write_bytes(video.read_bytes()[:300])
    path = data.data_file(2)
    df = pq.read_table(path).to_pandas()
    actions = np.stack(df["action"].to_numpy())
    actions[5, 3] = np.nan
    df["action"] = list(actions)
    pq.write_table(pa.Table.from_pandas(df, schema=pq.read_schema(path), preserve_index=False), path)
    metas = data.episodes
    last = metas[3].action_config[-1]
    metas[3].action_config[-1] = Segment(last.start_frame, metas[3].length + 30, last.action_text)
    write_episode_metadata(root, metas)
    return {1: "video", 2: "finite", 3: "segment"}


def export_v21(src: Path, dst: Path) -> Path:
    """Write a v3.0 dataset (one file per episode) in the released v2.1 layout, as lerobot 0.3
    wrote it: per-episode parquet and mp4, meta/{info.json, episodes.jsonl, episodes_stats.jsonl,
    tasks.jsonl}."""
    from lerobot.datasets.utils import load_info, load_tasks

    from vaops.components.dataset import LeRobotData

    data = LeRobotData(src)
    info = load_info(src)
    (dst / "meta").mkdir(parents=True)
    for m in data.episodes:
        ep = m.episode_index
        parquet = dst / "data" / "chunk-000" / f"episode_{ep:06d}.parquet"
        parquet.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pq.read_table(data.data_file(ep)), parquet)
        for key in data.video_keys:
            mp4 = dst / "videos" / "chunk-000" / key / f"episode_{ep:06d}.mp4"
            mp4.parent.mkdir(parents=True, exist_ok=True)
            video = data.standalone_video(ep, key)
            assert video is not None, f"episode {ep} {key}: no video of its own"
            shutil.copyfile(video, mp4)
    tasks = load_tasks(src)
    info.update(codebase_version="v2.1", total_chunks=1, total_videos=len(data.episodes) * len(data.video_keys),
                data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
    for key in ("data_files_size_in_mb", "video_files_size_in_mb"):
        info.pop(key, None)
    (dst / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    (dst / "meta" / "tasks.jsonl").write_text("".join(
        json.dumps({"task_index": int(i), "task": t}) + "\n" for t, i in zip(tasks.index, tasks["task_index"])))
    (dst / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": m.episode_index, "tasks": m.tasks, "length": m.length,
                    "action_config": [s.__dict__ for s in m.action_config]}) + "\n" for m in data.episodes))
    stats = pq.read_table(sorted((src / "meta" / "episodes").glob("*/*.parquet"))[0]).to_pylist()
    lines = []
    for row in stats:
        ep_stats: dict = {}
        for k, v in row.items():
            if k.startswith("stats/"):
                feature, stat = k[len("stats/"):].rsplit("/", 1)
                ep_stats.setdefault(feature, {})[stat] = v
        lines.append(json.dumps({"episode_index": row["episode_index"], "stats": ep_stats}) + "\n")
    (dst / "meta" / "episodes_stats.jsonl").write_text("".join(lines))
    return dst


def vaops(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `vaops` command line in a subprocess."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "vaops.pipelines.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"vaops {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


ROBOTWIN_CAMERAS = ("observation.images.cam_high", "observation.images.cam_left_wrist",
                    "observation.images.cam_right_wrist")
ROBOTWIN_FPS = 25


def robotwin_episode(seed: int, n: int = 20, size: tuple[int, int] = (32, 40)) -> dict:
    """A smooth RoboTwin-shaped episode: 14 joints (grippers at 6 and 13: action 0.1..0.9, state in
    metres 0.02..0.05), three moving cameras, one task."""
    t = np.arange(n)[:, None]
    c = np.arange(14)[None, :]
    action = 0.3 * np.sin(t / 6.0 + 0.5 * c + seed)
    action[:, [6, 13]] = 0.5 + 0.4 * np.sin(t[:, 0] / 5.0 + seed)[:, None]
    state = action.copy()
    state[:, [6, 13]] = 0.035 + 0.015 * np.sin(t[:, 0] / 5.0 + seed)[:, None]
    videos = {k: moving_frames(n, *size, seed=seed + 3 * i) for i, k in enumerate(ROBOTWIN_CAMERAS)}
    return {"action": action.astype(np.float32), "observation.state": state.astype(np.float32),
            "videos": videos, "tasks": ["lift the pot"] * n}


def write_lerobot_default(root: Path, episodes: list[dict], fps: int = ROBOTWIN_FPS,
                          robot_type: str = "aloha-agilex") -> Path:
    """Write `episodes` with lerobot's own writer and its defaults: every episode in one shared
    parquet and one shared mp4 per camera, no action_config."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    first = episodes[0]
    features: dict[str, dict[str, Any]] = {k: {"dtype": "float32", "shape": (first[k].shape[1],), "names": None}
                                           for k in ("action", "observation.state")}
    for k, frames in first["videos"].items():
        features[k] = {"dtype": "video", "shape": frames.shape[1:], "names": ["height", "width", "channels"]}
    ds = LeRobotDataset.create(repo_id=f"local/{root.name}", fps=fps, features=features, root=root,
                               robot_type=robot_type, use_videos=True)
    for ep in episodes:
        for t in range(len(ep["action"])):
            frame = {"action": ep["action"][t], "observation.state": ep["observation.state"][t],
                     "task": ep["tasks"][t], **{k: v[t] for k, v in ep["videos"].items()}}
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    return root


def shift_timestamps(root: Path, episode: int, from_frame: int, by_s: float) -> None:
    """Move the timestamps of `episode`'s frames from `from_frame` on by `by_s` (a recording gap)."""
    from vaops.components.dataset import LeRobotData

    path = LeRobotData(root).data_file(episode)
    schema = pq.read_schema(path)
    df = pq.read_table(path).to_pandas()
    rows = (df["episode_index"] == episode) & (df["frame_index"] >= from_frame)
    df.loc[rows, "timestamp"] = df.loc[rows, "timestamp"] + by_s
    pq.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False), path)
