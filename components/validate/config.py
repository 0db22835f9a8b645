"""Typed configuration of `vaops validate`, the robots it knows and its named presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Robot:
    """What a robot's datasets look like: rate, widths, cameras, and per-channel limits of its
    numeric features (field -> (low, high) per channel)."""

    fps: int
    action_dim: int
    state_dim: int
    cameras: tuple[str, ...]
    limits: dict[str, tuple[tuple[float, ...], tuple[float, ...]]]


def _arms(joints: tuple[tuple[float, float], ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Two arms of `joints` each followed by a gripper in 0..1 (the 14-channel bimanual layout)."""
    arm = joints + ((0.0, 1.0),)
    both = arm + arm
    return tuple(lo for lo, _ in both), tuple(hi for _, hi in both)


PI = math.pi
# ViperX 300 (gym-aloha's MuJoCo model): waist, shoulder, elbow, forearm roll, wrist angle, wrist
# rotate in rad; grippers normalised to 0..1 (closed..open) as gym-aloha records them.
ALOHA_JOINTS = ((-PI, PI), (-1.85005, 1.25664), (-1.76278, 1.6057), (-PI, PI), (-1.8675, 2.23402), (-PI, PI))
# RoboTwin 2.0 embodiments differ per arm model; +-pi bounds every revolute joint of them (the check
# then catches degrees stored as rad, or encoder counts), grippers 0..1 as RoboTwin records them.
ROBOTWIN_JOINTS = ((-PI, PI),) * 6

ROBOTS: dict[str, Robot] = {
    "aloha": Robot(fps=10, action_dim=14, state_dim=14, cameras=("observation.images.top",),
                   limits={"action": _arms(ALOHA_JOINTS), "observation.state": _arms(ALOHA_JOINTS)}),
    "robotwin": Robot(fps=25, action_dim=14, state_dim=14,
                      cameras=("observation.images.cam_high", "observation.images.cam_left_wrist",
                               "observation.images.cam_right_wrist"),
                      limits={"action": _arms(ROBOTWIN_JOINTS), "observation.state": _arms(ROBOTWIN_JOINTS)}),
    # LIBERO's actions (delta end-effector pose and gripper) are clipped to -1..1 by its controller;
    # its state (end-effector pose, finger positions) has no fixed bounds.
    "libero": Robot(fps=10, action_dim=7, state_dim=8,
                    cameras=("observation.images.agentview_rgb", "observation.images.eye_in_hand_rgb"),
                    limits={"action": ((-1.0,) * 7, (1.0,) * 7)}),
}
# lerobot's `robot_type` values that name one of ROBOTS
ROBOT_TYPES = {"aloha": "aloha", "robotwin": "robotwin", "aloha-agilex": "robotwin", "aloha_agilex": "robotwin",
               "libero": "libero"}
NO_ROBOT = "none"


@dataclass(frozen=True)
class ValidateConfig:
    dataset: str = field(default="", metadata={"help": "dataset directory to check (required)"})
    report_dir: str = field(default="data/reports/validate", metadata={"help": "where report.json/.md go"})
    robot: str | None = field(default=None, metadata={
        "help": f"robot whose joint limits apply: {', '.join(sorted(ROBOTS))} or {NO_ROBOT}; unset: the "
                f"dataset's robot_type where it names one"})
    fps: int | None = field(default=None, metadata={"help": "required fps; unset: any"})
    action_dim: int | None = field(default=None, metadata={"help": "required action width; unset: any"})
    state_dim: int | None = field(default=None, metadata={"help": "required observation.state width; unset: any"})
    cameras: tuple[str, ...] | None = field(default=None, metadata={"help": "required camera keys; unset: any"})
    timestamp_tolerance_s: float = field(default=1e-3, metadata={"help": "allowed distance from the fps grid"})
    decode_videos: bool = field(default=True, metadata={"help": "decode every frame of every video"})
    jump_fields: tuple[str, ...] = field(default=("action", "observation.state"), metadata={
        "help": "numeric features checked for single-frame jumps"})
    jump_factor: float = field(default=10.0, metadata={
        "help": "a jump's steps exceed this many times the episode's median step of the channel"})
    jump_min_step: float = field(default=0.1, metadata={
        "help": "and exceed this (the feature's units, e.g. rad)"})
    jump_max_frames: int = field(default=3, metadata={"help": "longest excursion out and back counted as a jump"})
    limit_margin: float = field(default=0.05, metadata={"help": "tolerance outside the robot's joint limits"})
    frozen_max_change: float = field(default=0.5, metadata={
        "help": "mean absolute change (of 255) between frames below which a camera counts as unchanged"})
    frozen_min_frames: int = field(default=8, metadata={
        "help": "unchanged frames while the robot moves that make a camera frozen"})
    moving_threshold: float = field(default=1e-3, metadata={
        "help": "per-frame change of any numeric channel that counts as the robot moving"})
    blank_max_std: float = field(default=3.0, metadata={
        "help": "pixel standard deviation (of 255) below which a frame counts as blank"})
    min_usable_fraction: float = field(default=0.5, metadata={
        "help": "unusable when fewer episodes than this fraction pass"})


def robot_preset(name: str) -> ValidateConfig:
    r = ROBOTS[name]
    return ValidateConfig(robot=name, fps=r.fps, action_dim=r.action_dim, state_dim=r.state_dim, cameras=r.cameras)


PRESETS: dict[str, ValidateConfig] = {"default": ValidateConfig(), **{name: robot_preset(name) for name in ROBOTS}}
