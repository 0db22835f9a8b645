"""Augmentations, each drawn once per clip so every frame of an episode changes the same way."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF


@dataclass(frozen=True)
class VisualParams:
    brightness: float
    contrast: float
    saturation: float
    hue: float
    shift: tuple[int, int]  # (down, right) in pixels; the uncovered border repeats the edge

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shift"] = list(self.shift)
        return d


def draw_visual(rng: np.random.Generator, brightness: float, contrast: float, saturation: float, hue: float,
                max_shift: int) -> VisualParams:
    def factor(strength: float) -> float:
        return float(rng.uniform(1 - strength, 1 + strength))

    down, right = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    return VisualParams(factor(brightness), factor(contrast), factor(saturation),
                        float(rng.uniform(-hue, hue)), (down, right))


def apply_visual(frames: np.ndarray, p: VisualParams) -> np.ndarray:
    """uint8 `[T, H, W, 3]` -> the same clip with colour, brightness, contrast and a crop-shift."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    video = TF.adjust_brightness(video, p.brightness)
    video = TF.adjust_contrast(video, p.contrast)
    video = TF.adjust_saturation(video, p.saturation)
    video = TF.adjust_hue(video, p.hue)
    pad = max(abs(p.shift[0]), abs(p.shift[1]))
    if pad:
        h, w = video.shape[-2:]
        video = TF.crop(TF.pad(video, [pad] * 4, padding_mode="edge"), pad - p.shift[0], pad - p.shift[1], h, w)
    return video.permute(0, 2, 3, 1).contiguous().numpy()


# Interchangeable phrasings of the sim tasks' words (and common manipulation verbs); every
# occurrence of a group's words becomes one member of the group, drawn per instruction.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("pick up", "grab", "grasp", "take"),
    ("transfer", "pass", "move"),
    ("hand over", "pass over", "give"),
    ("insert", "put", "slide"),
    ("cube", "block", "box"),
    ("peg", "rod", "stick"),
    ("socket", "slot", "receptacle"),
    ("arm", "gripper"),
    ("place", "put down", "set"),
)
TEMPLATES = ("{}", "please {}", "{}, please", "now {}", "your task: {}")


def _match_case(word: str, like: str) -> str:
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def paraphrase(text: str, rng: np.random.Generator) -> str:
    """A reworded instruction with the same meaning: synonyms swapped, then a polite frame."""
    if not text.strip():
        return text  # nothing to reword; framing it would make an instruction from nothing
    out = text
    for group in SYNONYMS:
        pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in group) + r")\b", flags=re.IGNORECASE)
        if pattern.search(out):
            choice = group[int(rng.integers(len(group)))]
            out = pattern.sub(lambda m: _match_case(choice, m.group(0)), out)
    body = out.rstrip(".")
    framed = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(body[:1].lower() + body[1:] if body else body)
    framed = framed[:1].upper() + framed[1:]
    if text.endswith("."):
        framed += "."
    return framed if framed != text else f"Please {body[:1].lower()}{body[1:]}" + ("." if text.endswith(".") else "")


def add_noise(values: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    return (values + rng.normal(0.0, std, size=values.shape)).astype(values.dtype)
