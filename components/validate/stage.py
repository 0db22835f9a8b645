"""Validate a LeRobot dataset before it is trusted: report.json + report.md (+ a thumbnail strip
per camera problem).

Dataset-level problems (unreadable metadata, no episodes, wrong fps, wrong action/state width,
missing camera) make it unusable. Episode-level problems (missing or unreadable parquet, frame
counts, timestamps off the fps grid or skipping, NaN/inf values, single-frame joint jumps, values
outside the robot's joint limits, missing, undecodable, frozen or blank video, missing task
text, segments out of range) put the episode in quarantine with its reasons; the dataset stays
usable while at least `min_usable_fraction` of its episodes pass.

The robot (`--robot`, a preset, or the dataset's `robot_type`) brings its joint limits; a preset
(`--preset aloha|robotwin|libero`) also requires its fps, widths and camera keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaops.components.dataset import DatasetError, LeRobotData
from vaops.components.reports import markdown_table, write_report
from vaops.components.stage_cli import progress

from .checks import Expectations, Problem, check_dataset, check_episode
from .config import NO_ROBOT, ROBOT_TYPES, ROBOTS, ValidateConfig

THUMBNAILS = "thumbnails"
STRIP_FRAMES = 6


@dataclass
class ValidationReport:
    dataset: str
    usable: bool
    episodes: int
    frames: int
    passed: list[int]
    dataset_problems: list[Problem]
    quarantine: dict[int, list[Problem]]
    robot: str | None = None
    # report-relative path of each camera problem's thumbnail strip, keyed by (episode, camera)
    strips: dict[tuple[int, str], str] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        checks: dict[str, int] = {}
        for problems in self.quarantine.values():
            for name in sorted({p.check for p in problems}):
                checks[name] = checks.get(name, 0) + 1
        return {
            "dataset": self.dataset,
            "usable": self.usable,
            "robot": self.robot,
            "episodes": self.episodes,
            "frames": self.frames,
            "passed": len(self.passed),
            "quarantined": len(self.quarantine),
            "quarantined_by_check": checks,
            "dataset_problems": [p.as_dict() for p in self.dataset_problems],
            "quarantine": [{"episode_index": ep, "reasons": [p.line() for p in ps],
                            "problems": [self._problem(p) for p in ps]} for ep, ps in sorted(self.quarantine.items())],
        }

    def _problem(self, p: Problem) -> dict:
        d = p.as_dict()
        strip = next((path for (ep, camera), path in sorted(self.strips.items())
                      if ep == p.episode and p.camera in (None, camera)), None)
        if strip is not None and p.frames is not None:
            d["thumbnails"] = strip
        return d

    def markdown(self) -> str:
        verdict = "usable" if self.usable else "**UNUSABLE**"
        out = [f"# Validation of `{self.dataset}`\n",
               f"Verdict: {verdict}. {self.episodes} episodes, {self.frames} frames; "
               f"{len(self.passed)} passed, {len(self.quarantine)} quarantined. Robot limits: "
               f"{self.robot or 'none'}.\n"]
        if self.dataset_problems:
            out += ["\n## Dataset problems\n\n", markdown_table(
                ["check", "file", "field", "problem"],
                [[p.check, p.file or "", p.field or "", p.message] for p in self.dataset_problems])]
        if self.quarantine:
            out += ["\n## Quarantined episodes\n\n", markdown_table(
                ["episode", "check", "file", "field", "frames", "reason"],
                [[ep, p.check, Path(p.file).name if p.file else "", p.field or "",
                  f"{p.frames[0]}-{p.frames[1]}" if p.frames else "", p.message]
                 for ep, ps in sorted(self.quarantine.items()) for p in ps])]
        if self.strips:
            out.append("\n## Affected cameras\n")
            for (ep, camera), path in sorted(self.strips.items()):
                out.append(f"\nEpisode {ep}, `{camera}`:\n\n![episode {ep} {camera}]({path})\n")
        return "".join(out)


def robot_for(cfg: ValidateConfig, data: LeRobotData | None) -> str | None:
    if cfg.robot == NO_ROBOT:
        return None
    if cfg.robot is not None:
        if cfg.robot not in ROBOTS:
            raise ValueError(f"robot {cfg.robot!r}: choose one of {sorted(ROBOTS)} or {NO_ROBOT}")
        return cfg.robot
    return ROBOT_TYPES.get((data.robot_type or "").lower()) if data is not None else None


def expectations(cfg: ValidateConfig, robot: str | None) -> Expectations:
    return Expectations(
        fps=cfg.fps, action_dim=cfg.action_dim, state_dim=cfg.state_dim, cameras=cfg.cameras,
        timestamp_tolerance_s=cfg.timestamp_tolerance_s, decode_videos=cfg.decode_videos,
        limits=dict(ROBOTS[robot].limits) if robot else {}, limit_margin=cfg.limit_margin,
        jump_fields=cfg.jump_fields, jump_factor=cfg.jump_factor, jump_min_step=cfg.jump_min_step,
        jump_max_frames=cfg.jump_max_frames, frozen_max_change=cfg.frozen_max_change,
        frozen_min_frames=cfg.frozen_min_frames, moving_threshold=cfg.moving_threshold,
        blank_max_std=cfg.blank_max_std)


def _check_config(cfg: ValidateConfig) -> None:
    if not cfg.dataset:
        raise ValueError("dataset is required (--dataset DIR)")
    for name in ("jump_factor", "jump_min_step", "frozen_max_change", "blank_max_std", "limit_margin"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be >= 0")
    for name in ("jump_max_frames", "frozen_min_frames"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)}: must be >= 1")


def validate(cfg: ValidateConfig, videos: dict[tuple[int, str], np.ndarray] | None = None) -> ValidationReport:
    """Run every check; nothing is written. `videos`, when given, receives the decoded frames of
    each (episode, camera) with a camera problem."""
    _check_config(cfg)
    robot = robot_for(cfg, None)
    try:
        data = LeRobotData(cfg.dataset)
    except DatasetError as e:
        return ValidationReport(cfg.dataset, False, 0, 0, [], [Problem("readable", str(e))], {}, robot)
    robot = robot_for(cfg, data)
    expect = expectations(cfg, robot)
    dataset_problems = check_dataset(data, expect)
    quarantine, passed = {}, []
    for meta in progress(iterable=data.episodes, desc="validate", unit="ep"):
        decoded: dict[str, np.ndarray] = {}
        problems = check_episode(data, meta, expect, decoded)
        if problems:
            quarantine[meta.episode_index] = problems
            if videos is not None:
                videos.update({(meta.episode_index, k): v for k, v in decoded.items()})
        else:
            passed.append(meta.episode_index)
    total = len(data.episodes)
    usable = not dataset_problems and total > 0 and len(passed) >= cfg.min_usable_fraction * total
    if total and not dataset_problems and not usable:
        dataset_problems.append(Problem("usable", f"only {len(passed)} of {total} episodes pass "
                                                  f"(need {cfg.min_usable_fraction:.0%})"))
    frames = sum(m.length for m in data.episodes)
    return ValidationReport(cfg.dataset, usable, total, frames, passed, dataset_problems, quarantine, robot)


def thumbnail_strip(frames: np.ndarray, span: tuple[int, int], path: Path, count: int = STRIP_FRAMES) -> None:
    """A PNG of `count` frames evenly spread over `span` (one frame either side when there is one)."""
    from PIL import Image

    first, last = max(0, span[0] - 1), min(len(frames) - 1, span[1] + 1)
    picks = np.unique(np.linspace(first, last, count).round().astype(int))
    gap = np.full((frames.shape[1], 2, 3), 255, np.uint8)
    row = np.concatenate([x for i in picks for x in (frames[i], gap)][:-1], axis=1)
    Image.fromarray(row).save(path)


def run(cfg: ValidateConfig) -> ValidationReport:
    videos: dict[tuple[int, str], np.ndarray] = {}
    report = validate(cfg, videos)
    extra = {}
    for ep, problems in report.quarantine.items():
        for p in problems:
            camera = p.camera or next((k for e, k in videos if e == ep), None)
            if p.frames is not None and camera is not None and (ep, camera) not in report.strips:
                name = f"{THUMBNAILS}-ep{ep}-{camera.replace('/', '_')}.png"
                report.strips[(ep, camera)] = name
                extra[name] = (lambda path, f=videos[(ep, camera)], span=p.frames: thumbnail_strip(f, span, path))
    write_report(cfg.report_dir, report.as_dict(), report.markdown(), extra=extra)
    return report
