"""Typed configuration of `vaops demos` and its named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vaops.models.config import ALOHA_CAMERAS

CAMERA = ALOHA_CAMERAS[0]
TASK_NAMES = ("AlohaTransferCube-v0", "AlohaInsertion-v0")
SEGMENT_MODES = ("task", "phases")


@dataclass(frozen=True)
class DemosConfig:
    output: str = field(default="data/demos", metadata={"help": "dataset directory to write"})
    task: str = field(default="AlohaTransferCube-v0", metadata={"help": f"sim task: {', '.join(TASK_NAMES)}"})
    episodes: int = field(default=10, metadata={"help": "successful episodes to record"})
    first_seed: int = field(default=0, metadata={"help": "seed of the first episode (then +1 per try)"})
    max_attempts: int = field(default=40, metadata={"help": "seeds tried before giving up"})
    time_scale: float = field(default=0.6, metadata={"help": "episode duration as a fraction of ACT's 8 s plan"})
    fps: int = field(default=10, metadata={"help": "recorded frames (and actions) per second; divides 50"})
    image_height: int = field(default=CAMERA.height, metadata={"help": "recorded top-camera height"})
    image_width: int = field(default=CAMERA.width, metadata={"help": "recorded top-camera width"})
    keep_failed: bool = field(default=False, metadata={"help": "also record failed rollouts (success=false)"})
    vcodec: str = field(default="libsvtav1", metadata={"help": "video codec of lerobot's writer"})
    # The prompt a policy is evaluated with is the task's text (evaluate/aloha.py); "task" trains on
    # that same text, "phases" splits each episode into its plan's phases with their own texts.
    segments: str = field(default="phases", metadata={
        "help": "action_config segments: task (one, the task's text) or phases (the plan's phases)"})
    workers: int = field(default=1, metadata={"help": "rollout processes (each renders with its own EGL context), and as many dataset writers"})

    def __post_init__(self):
        if self.segments not in SEGMENT_MODES:
            raise ValueError(f"segments={self.segments!r}: choose one of {', '.join(SEGMENT_MODES)}")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: need at least one")

    @property
    def tasks(self) -> tuple[str, ...]:
        """`task` may name several tasks, comma-separated: `episodes` are recorded for each."""
        return tuple(t.strip() for t in self.task.split(",") if t.strip())


PRESETS: dict[str, DemosConfig] = {
    "default": DemosConfig(),
    "insertion": DemosConfig(task="AlohaInsertion-v0", output="data/demos-insertion"),
    "test": DemosConfig(episodes=4, time_scale=0.5),
    # The `small` model preset's data: both tasks at its camera size, one segment per episode with
    # the prompt the evaluation sends, 49 frames so the 1 + 16k frames it encodes cover the episode.
    "small": DemosConfig(task=",".join(TASK_NAMES), episodes=100, max_attempts=150, time_scale=0.6125,
                         image_height=192, image_width=256, segments="task", workers=8),
}


def for_model_preset(cfg: DemosConfig, preset_name: str) -> DemosConfig:
    """`cfg` recorded at the camera size (and rate) of a model preset, so a policy sees what it trained on."""
    from vaops.models.config import get_preset

    preset = get_preset(preset_name)
    cam = preset.cameras[0]
    if cam.key != CAMERA.key or len(preset.cameras) != 1:
        raise ValueError(f"preset {preset_name!r} needs cameras {[c.key for c in preset.cameras]}; the ALOHA sim "
                         f"records only {CAMERA.key!r}")
    return dataclasses.replace(cfg, image_height=cam.height, image_width=cam.width, fps=preset.fps)
