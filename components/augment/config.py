"""Typed configuration of `vaops augment` and its named presets."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AugmentConfig:
    dataset: str = field(default="data/clean", metadata={"help": "dataset directory to augment"})
    output: str = field(default="data/augmented", metadata={"help": "augmented dataset directory to write"})
    report_dir: str = field(default="data/reports/augment", metadata={"help": "where report.json/.md go"})
    copies: int = field(default=1, metadata={"help": "augmented copies per original episode"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    brightness: float = field(default=0.2, metadata={"help": "brightness factor drawn in 1 +- this"})
    contrast: float = field(default=0.2, metadata={"help": "contrast factor drawn in 1 +- this"})
    saturation: float = field(default=0.2, metadata={"help": "saturation factor drawn in 1 +- this"})
    hue: float = field(default=0.02, metadata={"help": "hue shift drawn in +- this (fraction of the circle)"})
    max_shift: float = field(default=0.05, metadata={"help": "crop-shift up to this fraction of the image size"})
    paraphrase: bool = field(default=True, metadata={"help": "reword instructions and segment texts"})
    action_noise_std: float = field(default=0.0, metadata={"help": "std of Gaussian noise on noise_fields"})
    noise_fields: tuple[str, ...] = field(default=("action",), metadata={"help": "features that get noise"})
    vcodec: str = field(default="libsvtav1", metadata={"help": "video codec of lerobot's writer"})
    workers: int = field(default=1, metadata={"help": "dataset writer processes (each writes shards of episodes)"})


PRESETS: dict[str, AugmentConfig] = {
    "default": AugmentConfig(),
    # Colour only: the grasp is a function of where the cube is in the image, so a crop-shift would
    # teach wrong actions, and the policy is prompted with the task's own text (no paraphrases).
    "photometric": AugmentConfig(max_shift=0.0, paraphrase=False),
    "strong": AugmentConfig(copies=2, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, max_shift=0.08,
                            action_noise_std=0.005),
}
