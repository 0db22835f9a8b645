"""Clean a dataset by documented, configurable rules; report every episode dropped or changed.

Rules, in the order they apply:
1. quarantine: episodes `vaops validate` quarantined (its report.json, or the same checks run
   here) are dropped with validate's reasons: missing/unreadable parquet or video, frame
   counts, timestamps, NaN/inf values, segments out of range.
2. drop_failed: episodes whose metadata records `success: false`.
3. drop_duplicates: episodes whose action sequence equals an earlier one's (to 1e-6).
4. trim_idle: idle head and tail frames (every action channel moves less than
   `idle_threshold` to the next frame) are cut, `keep_idle` kept at each end; segments shift.
5. min_length: episodes shorter than `min_length` frames (after trimming) are dropped.
6. static: episodes whose largest per-channel action range is below `static_threshold`.
7. clip_outliers: values of `clip_fields` outside per-channel `[q - m*s, Q + m*s]` (q, Q the
   `outlier_quantile` and `1 - outlier_quantile` quantiles over all kept frames, s = Q - q,
   m = `outlier_margin`) are clipped to that range.
8. gripper_channels: those channels of `gripper_fields` (action and state alike by default, so
   both carry the gripper in the same units) are mapped linearly from each field's own range over
   the kept frames to `gripper_range` (e.g. closed 0, open 1).

Without a validation report, validate's checks run here with their defaults and the robot named
by the dataset's `robot_type`. The video encoder's own log goes to `encoder.log` in the report
folder; the console shows progress bars and the summary.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vaops.components.dataset import ENCODER_LOG, DatasetError, Episode, LeRobotData, write_dataset
from vaops.components.reports import markdown_table, read_report, write_report
from vaops.components.stage_cli import progress
from vaops.components.validate.checks import check_episode
from vaops.components.validate.config import ValidateConfig
from vaops.components.validate.stage import expectations, robot_for

from . import rules
from .config import CleanConfig




@dataclass
class Decision:
    episode: int
    drop: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    span: tuple[int, int] = (0, 0)
    new_index: int | None = None


@dataclass
class CleanResult:
    output: Path
    kept: int
    dropped: dict[int, list[str]]
    changed: dict[int, list[str]]


def _quarantine(data: LeRobotData, cfg: CleanConfig) -> dict[int, list[str]]:
    if cfg.validation_report is not None:
        report = read_report(cfg.validation_report)
        if not report.get("usable", False):
            raise DatasetError(f"{cfg.validation_report}: validation found {cfg.dataset} unusable "
                               f"({[p['message'] for p in report.get('dataset_problems', [])]})")
        return {int(q["episode_index"]): list(q["reasons"]) for q in report["quarantine"]}
    out = {}
    defaults = ValidateConfig(dataset=cfg.dataset)
    expect = expectations(defaults, robot_for(defaults, data))
    for meta in progress(iterable=data.episodes, desc="check", unit="ep"):
        problems = check_episode(data, meta, expect)
        if problems:
            out[meta.episode_index] = [p.line() for p in problems]
    return out


def _decide(data: LeRobotData, cfg: CleanConfig) -> dict[int, Decision]:
    quarantine = _quarantine(data, cfg)
    decisions = {m.episode_index: Decision(m.episode_index, span=(0, m.length)) for m in data.episodes}
    seen: dict[str, int] = {}
    for meta in data.episodes:
        d = decisions[meta.episode_index]
        if meta.episode_index in quarantine:
            d.drop += [f"quarantined by validation: {r}" for r in quarantine[meta.episode_index]]
            continue
        if cfg.drop_failed and meta.success is False:
            d.drop.append("failed: the episode is recorded as unsuccessful")
            continue
        actions = data.arrays(meta.episode_index)["action"]
        if cfg.drop_duplicates:
            key = rules.fingerprint(actions)
            if key in seen:
                d.drop.append(f"duplicate of episode {seen[key]}")
                continue
            seen[key] = meta.episode_index
        if cfg.trim_idle:
            d.span = rules.idle_span(actions, cfg.idle_threshold, cfg.keep_idle)
            if d.span != (0, len(actions)):
                d.changes.append(f"trimmed idle frames: kept [{d.span[0]}, {d.span[1]}) of {len(actions)}")
        length = d.span[1] - d.span[0]
        if length < cfg.min_length:
            d.drop.append(f"short: {length} frames < min_length {cfg.min_length}")
            continue
        motion = rules.action_range(actions[d.span[0]:d.span[1]])
        if motion < cfg.static_threshold:
            d.drop.append(f"static: actions move at most {motion:.2e} < static_threshold {cfg.static_threshold}")
    return decisions


def _dataset_ranges(data: LeRobotData, cfg: CleanConfig, kept: list[Decision]):
    """Clipping bounds and gripper source ranges per field, over the kept frames."""
    clip = cfg.clip_fields if cfg.clip_outliers else ()
    grip_fields = [f for f in cfg.gripper_fields if f in data.array_keys] if cfg.gripper_channels else []
    if cfg.gripper_channels and not grip_fields:
        raise DatasetError(f"{data.root}: none of the gripper_fields {list(cfg.gripper_fields)} is in the dataset "
                           f"({data.array_keys})")
    for f in grip_fields:
        width = int(np.prod(data.features[f]["shape"]))
        if max(cfg.gripper_channels) >= width or min(cfg.gripper_channels) < 0:
            raise DatasetError(f"{data.root}: gripper_channels {list(cfg.gripper_channels)} are outside {f}'s "
                               f"{width} channels")
    fields = sorted(set(clip) | set(grip_fields))
    missing = [f for f in fields if f not in data.array_keys]
    if missing:
        raise DatasetError(f"{data.root}: features {missing} to clean are not in the dataset ({data.array_keys})")
    values: dict[str, list[np.ndarray]] = {f: [] for f in fields}
    for d in kept:
        arrays = data.arrays(d.episode)
        for f in fields:
            values[f].append(arrays[f][d.span[0]:d.span[1]].reshape(d.span[1] - d.span[0], -1))
    stacked = {f: np.concatenate(v) for f, v in values.items()}
    bounds = {f: rules.outlier_bounds(stacked[f], cfg.outlier_quantile, cfg.outlier_margin)
              for f in clip}
    grip = {}
    for f in grip_fields:
        v = np.clip(stacked[f], *bounds[f]) if f in bounds else stacked[f]
        grip[f] = (v.min(axis=0), v.max(axis=0))
    return bounds, grip


def _apply(ep: Episode, d: Decision, cfg: CleanConfig, bounds, grip) -> Episode:
    a, b = d.span
    arrays = {k: v[a:b] for k, v in ep.arrays.items()}
    for f, (lo, hi) in bounds.items():
        flat = arrays[f].reshape(b - a, -1)
        n = int(((flat < lo) | (flat > hi)).sum())
        if n:
            arrays[f] = np.clip(flat, lo, hi).reshape(arrays[f].shape).astype(arrays[f].dtype)
            d.changes.append(f"clipped {n} outlier values of {f}")
    target = (float(cfg.gripper_range[0]), float(cfg.gripper_range[1]))
    for f, source in grip.items():
        already = all(abs(source[0][c] - target[0]) < 1e-6 and abs(source[1][c] - target[1]) < 1e-6
                      for c in cfg.gripper_channels)
        if not already:
            arrays[f] = rules.rescale(arrays[f], cfg.gripper_channels, source, target).astype(arrays[f].dtype)
            ranges = [(round(float(source[0][c]), 4), round(float(source[1][c]), 4)) for c in cfg.gripper_channels]
            d.changes.append(f"{f} gripper channels {list(cfg.gripper_channels)} mapped from {ranges} to {target}")
    meta = dataclasses.replace(ep.meta, action_config=rules.shift_segments(ep.meta.action_config, a, b))
    if len(meta.action_config) != len(ep.meta.action_config):
        d.changes.append(f"{len(ep.meta.action_config) - len(meta.action_config)} segments fell in trimmed frames")
    untouched_video = (a, b) == (0, ep.length)
    return Episode(meta, arrays, {k: v[a:b] for k, v in ep.videos.items()}, ep.frame_tasks[a:b],
                   ep.video_sources if untouched_video else {})


def run(cfg: CleanConfig) -> CleanResult:
    if len(cfg.gripper_range) != 2:
        raise ValueError(f"gripper_range must be two numbers (lo hi), got {cfg.gripper_range}")
    data = LeRobotData(cfg.dataset)
    decisions = _decide(data, cfg)
    kept = [d for d in decisions.values() if not d.drop]
    if not kept:
        raise DatasetError(f"{cfg.dataset}: every episode was dropped; see the reasons with `vaops validate`")
    bounds, grip = _dataset_ranges(data, cfg, kept)

    def cleaned() -> Iterator[Episode]:
        for new_index, d in enumerate(kept):
            d.new_index = new_index
            yield _apply(data.episode(d.episode), d, cfg, bounds, grip)

    with tempfile.TemporaryDirectory(prefix="vaops-clean-") as logs:
        log = Path(logs) / ENCODER_LOG
        out = write_dataset(cfg.output, cleaned(), fps=data.fps, features=data.user_features(),
                            robot_type=data.robot_type, vcodec=cfg.vcodec, total=len(kept), desc="write cleaned",
                            log_path=log, workers=cfg.workers)
        result = CleanResult(Path(out), len(kept), {d.episode: d.drop for d in decisions.values() if d.drop},
                             {d.episode: d.changes for d in kept if d.changes})
        write_report(cfg.report_dir, _report(cfg, decisions, result), _markdown(cfg, decisions, result),
                     extra={ENCODER_LOG: lambda path: shutil.copyfile(log, path) if log.exists() else path.touch()})
    return result


def _report(cfg: CleanConfig, decisions: dict[int, Decision], result: CleanResult) -> dict:
    return {
        "dataset": cfg.dataset, "output": cfg.output, "rules": dataclasses.asdict(cfg),
        "episodes_in": len(decisions), "episodes_out": result.kept,
        "dropped": [{"episode_index": ep, "reasons": r} for ep, r in sorted(result.dropped.items())],
        "changed": [{"episode_index": ep, "new_index": decisions[ep].new_index, "changes": c}
                    for ep, c in sorted(result.changed.items())],
        "index_map": {str(d.episode): d.new_index for d in decisions.values() if d.new_index is not None},
    }


def _markdown(cfg: CleanConfig, decisions: dict[int, Decision], result: CleanResult) -> str:
    out = [f"# Cleaning of `{cfg.dataset}`\n\n",
           f"{len(decisions)} episodes in, {result.kept} out ({len(result.dropped)} dropped, "
           f"{len(result.changed)} changed). Output: `{cfg.output}`.\n"]
    if result.dropped:
        out += ["\n## Dropped\n\n", markdown_table(["episode", "reason"], [[ep, r] for ep, rs in
                                                                          sorted(result.dropped.items()) for r in rs])]
    if result.changed:
        out += ["\n## Changed\n\n", markdown_table(
            ["episode", "new index", "change"],
            [[ep, decisions[ep].new_index, c] for ep, cs in sorted(result.changed.items()) for c in cs])]
    return "".join(out)
