"""Typed configuration of `vaops clean` and its named presets."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CleanConfig:
    dataset: str = field(default="data/demos", metadata={"help": "dataset directory to clean"})
    output: str = field(default="data/clean", metadata={"help": "cleaned dataset directory to write"})
    report_dir: str = field(default="data/reports/clean", metadata={"help": "where report.json/.md go"})
    validation_report: str | None = field(default=None, metadata={
        "help": "report folder of `vaops validate` on this dataset; unset: its checks run here"})
    drop_failed: bool = field(default=True, metadata={"help": "drop episodes recorded as failed"})
    drop_duplicates: bool = field(default=True, metadata={"help": "drop repeated action sequences"})
    trim_idle: bool = field(default=True, metadata={"help": "cut idle head and tail frames"})
    idle_threshold: float = field(default=1e-4, metadata={"help": "per-frame action change counted as idle"})
    keep_idle: int = field(default=1, metadata={"help": "idle frames kept at each end"})
    min_length: int = field(default=8, metadata={"help": "shortest episode kept (frames, after trimming)"})
    static_threshold: float = field(default=1e-3, metadata={"help": "drop episodes whose actions move less"})
    clip_outliers: bool = field(default=True, metadata={"help": "clip values far outside the data's range"})
    clip_fields: tuple[str, ...] = field(default=("action", "observation.state"), metadata={
        "help": "numeric features that are clipped"})
    outlier_quantile: float = field(default=0.01, metadata={"help": "quantile q of the clipping range"})
    outlier_margin: float = field(default=1.0, metadata={"help": "margin m of the clipping range"})
    gripper_channels: tuple[int, ...] = field(default=(), metadata={"help": "gripper channel indices"})
    gripper_fields: tuple[str, ...] = field(default=("action", "observation.state"), metadata={
        "help": "features whose gripper channels are mapped (each from its own range)"})
    gripper_range: tuple[float, ...] = field(default=(0.0, 1.0), metadata={"help": "target gripper range lo hi"})
    vcodec: str = field(default="libsvtav1", metadata={"help": "video codec of lerobot's writer"})
    workers: int = field(default=1, metadata={"help": "dataset writer processes (each writes shards of episodes)"})


PRESETS: dict[str, CleanConfig] = {
    "default": CleanConfig(),
    "aloha": CleanConfig(gripper_channels=(6, 13)),
    # The `small` policy's demos: their length is chosen so the encoded 1 + 16k frames cover the
    # whole plan, release included; trimming the idle tail would cut the last latent frame.
    "aloha-full": CleanConfig(gripper_channels=(6, 13), trim_idle=False),
}
