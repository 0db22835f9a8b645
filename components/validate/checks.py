"""The dataset checks: each returns `Problem`s naming the episode, file, field or camera, and
the frame range.

Dataset-level problems make the whole dataset unusable; episode-level problems quarantine
that episode only. The per-episode signal checks judge an episode by its own statistics:

- jump: a channel leaves its course for at most `jump_max_frames` frames and comes back (a
  glitch, a dropped joint reading); both steps exceed `jump_factor` times the episode's own
  median step of that channel and `jump_min_step`. A one-way step (a gripper closing in one
  frame, an angle wrapping at +-pi) is not a jump.
- limits: values outside the robot's joint limits (plus `limit_margin`), where they are known.
- frozen: a camera whose frames stop changing (mean absolute change below `frozen_max_change`
  of 255) for `frozen_min_frames` or more consecutive frames while the robot moves.
- blank: frames of one flat colour (pixel standard deviation below `blank_max_std`).
- task: frames whose task text is missing or empty.
- timestamps: a skip (a step above 1.5 frame periods) names the frame where the gap starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np

from vaops.components.dataset import DatasetError, EpisodeMeta, LeRobotData


@dataclass(frozen=True)
class Problem:
    check: str
    message: str
    episode: int | None = None
    file: str | None = None
    field: str | None = None
    frames: tuple[int, int] | None = None  # first and last affected frame
    camera: str | None = None  # the camera whose frames show it (thumbnail strips)

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if self.frames is not None:
            out["frames"] = list(self.frames)
        return out

    def line(self) -> str:
        """The problem as one console line: field, frames, message."""
        where = self.field or self.camera or ""
        if self.frames is not None:
            where += f" frames {self.frames[0]}-{self.frames[1]}"
        return f"[{where.strip()}] {self.message}" if where.strip() else self.message


@dataclass(frozen=True)
class Expectations:
    fps: int | None = None
    action_dim: int | None = None
    state_dim: int | None = None
    cameras: tuple[str, ...] | None = None
    timestamp_tolerance_s: float = 1e-3
    decode_videos: bool = True
    # field -> (low, high) per channel; empty: the robot's limits are not known
    limits: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = dataclasses.field(default_factory=dict)
    limit_margin: float = 0.05
    jump_fields: tuple[str, ...] = ("action", "observation.state")
    jump_factor: float = 10.0
    jump_min_step: float = 0.1
    jump_max_frames: int = 3
    frozen_max_change: float = 0.5
    frozen_min_frames: int = 8
    moving_threshold: float = 1e-3
    blank_max_std: float = 3.0


def check_dataset(data: LeRobotData, expect: Expectations) -> list[Problem]:
    info_file = str(data.root / "meta" / "info.json")
    problems = []
    if not data.episodes:
        problems.append(Problem("empty", "the dataset has no episodes", file=info_file))
    if expect.fps is not None and data.fps != expect.fps:
        problems.append(Problem("fps", f"declared fps is {data.fps}, expected {expect.fps}",
                                file=info_file, field="fps"))
    for key, want in (("action", expect.action_dim), ("observation.state", expect.state_dim)):
        if want is None:
            continue
        if key not in data.features:
            problems.append(Problem("width", f"feature {key!r} is not declared", file=info_file, field=key))
        elif tuple(data.features[key]["shape"]) != (want,):
            problems.append(Problem("width", f"{key} has shape {data.features[key]['shape']}, expected [{want}]",
                                    file=info_file, field=key))
    for cam in expect.cameras or ():
        if cam not in data.video_keys:
            problems.append(Problem("camera", f"camera {cam!r} is not among the dataset's videos "
                                              f"{data.video_keys}", file=info_file, field=cam))
    return problems


def check_segments(meta: EpisodeMeta, file: str | None = None) -> list[Problem]:
    problems = []
    for i, seg in enumerate(meta.action_config):
        where = f"action_config[{i}]"
        if not 0 <= seg.start_frame < seg.end_frame <= meta.length:
            problems.append(Problem(
                "segment", f"segment [{seg.start_frame}, {seg.end_frame}) is outside the episode's "
                           f"{meta.length} frames or empty", episode=meta.episode_index, file=file, field=where))
        if not seg.action_text.strip():
            problems.append(Problem("segment", "segment has no action_text", episode=meta.episode_index,
                                    file=file, field=where))
    return problems


def check_episode(data: LeRobotData, meta: EpisodeMeta, expect: Expectations,
                  videos: dict[str, np.ndarray] | None = None) -> list[Problem]:
    """Every episode-level check; `videos`, when given, receives the decoded frames of the
    cameras that have a problem (for the report's thumbnail strips)."""
    ep = meta.episode_index
    problems = check_segments(meta, str(data.meta_file(ep)))
    try:
        frames = data.frames(ep)
    except DatasetError as e:
        return problems + [Problem("parquet", str(e), episode=ep, file=str(data.data_file(ep)))]
    data_file = str(data.data_file(ep))
    n = len(frames)
    if n != meta.length:
        problems.append(Problem("frame_count", f"parquet has {n} rows, the episode metadata says {meta.length}",
                                episode=ep, file=data_file, field="length"))
    if n == 0:
        return problems
    if not np.array_equal(frames["frame_index"].to_numpy(), np.arange(n)):
        problems.append(Problem("frame_index", f"frame_index is not 0..{n - 1}", episode=ep, file=data_file,
                                field="frame_index"))
    problems += _check_timestamps(frames["timestamp"].to_numpy(np.float64), data.fps, expect, ep, data_file)
    problems += _check_tasks(data, meta, frames, data_file)
    try:
        arrays = data.arrays(ep, frames)
    except (DatasetError, ValueError) as e:
        return problems + [Problem("width", str(e), episode=ep, file=data_file)]
    finite = True
    for key, values in arrays.items():
        bad = ~np.isfinite(values)
        if bad.any():
            finite = False
            rows = np.flatnonzero(bad.reshape(n, -1).any(axis=1))
            problems.append(Problem("finite", f"{int(bad.sum())} NaN/inf values in {len(rows)} frames "
                                              f"(first at frame {int(rows[0])})",
                                    episode=ep, file=data_file, field=key, frames=(int(rows[0]), int(rows[-1]))))
    if finite:
        for key in expect.jump_fields:
            if key in arrays:
                problems += _check_jumps(arrays[key].reshape(n, -1), key, expect, ep, data_file)
        for key, (lo, hi) in expect.limits.items():
            if key in arrays:
                problems += _check_limits(arrays[key].reshape(n, -1), key, lo, hi, expect.limit_margin, ep,
                                          data_file)
    moving = _moving_steps(arrays, expect.moving_threshold) if finite else np.ones(max(n - 1, 0), bool)
    decoded = {}
    for key in data.video_keys:
        found, decoded[key] = _check_video(data, ep, key, frames["timestamp"].to_numpy(), expect, moving)
        problems += found
    if videos is not None:
        # the cameras with a problem; for a problem of the numbers (a jump, a skip) the first camera
        cameras = {p.camera for p in problems if p.camera} or (
            {next(iter(decoded))} if decoded and any(p.frames for p in problems) else set())
        videos.update({k: decoded[k] for k in cameras if decoded.get(k) is not None})
    return problems


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """`[first, last]` of every run of True in a 1-D mask."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2])]


def _check_timestamps(ts: np.ndarray, fps: int, expect: Expectations, ep: int, file: str) -> list[Problem]:
    problems = []
    dt = np.diff(ts)
    if len(dt) and not (dt > 0).all():
        i = int(np.flatnonzero(dt <= 0)[0])
        problems.append(Problem("timestamps", f"timestamps not increasing at frame {i + 1} "
                                              f"({ts[i]:.4f} -> {ts[i + 1]:.4f})", episode=ep, file=file,
                                field="timestamp", frames=(i, i + 1)))
    skips = np.flatnonzero(dt > 1.5 / fps)
    if len(skips):
        i = int(skips[0])
        more = f"; {len(skips) - 1} more skips" if len(skips) > 1 else ""
        problems.append(Problem("timestamps", f"timestamps skip after frame {i}: {ts[i]:.4f} -> {ts[i + 1]:.4f} s "
                                              f"({dt[i] * fps - 1:.1f} frame periods missing at {fps} fps){more}",
                                episode=ep, file=file, field="timestamp", frames=(i, i + 1)))
        return problems  # every later frame is off the grid because of the skip
    off = np.abs(ts - np.arange(len(ts)) / fps)
    if (off > expect.timestamp_tolerance_s).any():
        i = int(np.argmax(off))
        problems.append(Problem("timestamps", f"timestamp {ts[i]:.4f} at frame {i} is off the declared "
                                              f"{fps} fps grid by {off[i]:.4f} s", episode=ep, file=file,
                                field="timestamp", frames=(i, i)))
    return problems


def _check_tasks(data: LeRobotData, meta: EpisodeMeta, frames, file: str) -> list[Problem]:
    ep = meta.episode_index
    texts = data.task_texts(frames["task_index"].to_numpy())
    empty = np.array([not (t or "").strip() for t in texts])
    problems = []
    for a, b in _runs(empty)[:1]:
        problems.append(Problem("task", f"{int(empty.sum())} frames have no task text (first run: frames {a}-{b})",
                                episode=ep, file=file, field="task", frames=(a, b)))
    if not empty.any() and not any(t.strip() for t in meta.tasks):
        problems.append(Problem("task", "the episode metadata lists no task text", episode=ep,
                                file=str(data.meta_file(ep)), field="tasks"))
    return problems


def _check_jumps(values: np.ndarray, key: str, expect: Expectations, ep: int, file: str) -> list[Problem]:
    """Excursions of at most `jump_max_frames` frames out and back, per channel."""
    if len(values) < 3:
        return []
    steps = np.diff(values.astype(np.float64), axis=0)
    median = np.median(np.abs(steps), axis=0)
    threshold = np.maximum(expect.jump_factor * median, expect.jump_min_step)
    problems = []
    for c in range(values.shape[1]):
        big = np.flatnonzero(np.abs(steps[:, c]) > threshold[c])
        found = []
        for i in big:  # step i goes from frame i to i + 1
            for j in big[(big > i) & (big <= i + expect.jump_max_frames)]:
                out_and_back = np.sign(steps[i, c]) != np.sign(steps[j, c])
                returned = abs(values[j + 1, c] - values[i, c]) < 0.5 * min(abs(steps[i, c]), abs(steps[j, c]))
                if out_and_back and returned:
                    found.append((int(i) + 1, int(j), float(steps[i, c])))
                    break
        if found:
            a, b, size = found[0]
            more = f"; {len(found) - 1} more" if len(found) > 1 else ""
            problems.append(Problem(
                "jump", f"channel {c} jumps by {size:+.3f} at frames {a}-{b} and back (the episode's median "
                        f"step there is {median[c]:.4f}, threshold {threshold[c]:.3f}){more}",
                episode=ep, file=file, field=f"{key}[{c}]", frames=(a, b)))
    return problems


def _check_limits(values: np.ndarray, key: str, lo, hi, margin: float, ep: int, file: str) -> list[Problem]:
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if values.shape[1] != len(lo):
        return []  # another robot's layout: the width check (presets) speaks about it
    outside = (values < lo - margin) | (values > hi + margin)
    problems = []
    for c in np.flatnonzero(outside.any(axis=0)):
        rows = np.flatnonzero(outside[:, c])
        worst = values[rows, c][np.argmax(np.abs(values[rows, c] - (lo[c] + hi[c]) / 2))]
        problems.append(Problem(
            "limits", f"channel {c} reaches {worst:.3f} in {len(rows)} frames, outside the robot's limits "
                      f"[{lo[c]:.3f}, {hi[c]:.3f}] (+-{margin})", episode=ep, file=file, field=f"{key}[{c}]",
            frames=(int(rows[0]), int(rows[-1]))))
    return problems


def _moving_steps(arrays: dict[str, np.ndarray], threshold: float) -> np.ndarray:
    """Per step t -> t + 1: does any numeric channel change by at least `threshold`."""
    n = len(next(iter(arrays.values()))) if arrays else 0
    moving = np.zeros(max(n - 1, 0), bool)
    for values in arrays.values():
        if n > 1:
            moving |= np.abs(np.diff(values.reshape(n, -1).astype(np.float64), axis=0)).max(axis=1) >= threshold
    return moving


def _check_video(data: LeRobotData, ep: int, key: str, ts: np.ndarray, expect: Expectations,
                 moving: np.ndarray) -> tuple[list[Problem], np.ndarray | None]:
    try:
        path = data.video_file(ep, key)
    except DatasetError as e:
        return [Problem("video", str(e), episode=ep, field=key)], None
    if not path.is_file():
        return [Problem("video", f"video of camera {key!r} is missing", episode=ep, file=str(path), field=key)], None
    if not expect.decode_videos:
        return [], None
    try:
        frames = data.video(ep, key, ts)
    except DatasetError as e:
        return [Problem("video", _short(str(e)), episode=ep, file=str(path), field=key)], None
    problems = []
    want = tuple(data.features[key]["shape"])
    if frames.shape[1:] != want:
        problems.append(Problem("video", f"decoded frames are {frames.shape[1:]}, declared {want}",
                                episode=ep, file=str(path), field=key))
    if len(frames) != len(ts):
        problems.append(Problem("frame_count", f"video has {len(frames)} frames for {len(ts)} parquet rows",
                                episode=ep, file=str(path), field=key))
        return problems, frames
    problems += _check_pixels(frames, key, expect, moving, ep, str(path))
    return problems, frames


def _check_pixels(frames: np.ndarray, key: str, expect: Expectations, moving: np.ndarray, ep: int,
                  file: str) -> list[Problem]:
    problems = []
    flat = frames.reshape(len(frames), -1)
    std = flat.std(axis=1)
    blank = std < expect.blank_max_std
    runs = _runs(blank)
    if runs:
        a, b = runs[0]
        level = float(flat[a].mean())
        more = f"; {len(runs) - 1} more blank runs" if len(runs) > 1 else ""
        problems.append(Problem("blank", f"camera {key!r} is blank (one flat colour, mean {level:.0f}) in "
                                         f"{int(blank.sum())} of {len(frames)} frames, first frames {a}-{b}{more}",
                                episode=ep, file=file, field=key, frames=(a, b), camera=key))
    if len(frames) > 1:
        change = np.abs(np.diff(flat.astype(np.int16), axis=0)).mean(axis=1)
        still = (change < expect.frozen_max_change) & ~(blank[1:] & blank[:-1])
        for a, b in _runs(still):  # steps a..b: frames a..b+1 are the same
            if int(moving[a:b + 1].sum()) + 1 >= expect.frozen_min_frames:
                problems.append(Problem(
                    "frozen", f"camera {key!r} shows the same image for frames {a}-{b + 1} "
                              f"({b - a + 2} frames) while the robot moves", episode=ep, file=file, field=key,
                    frames=(a, b + 1), camera=key))
                break
    return problems


def _short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[:limit] + "..."

