"""Augment a dataset: originals kept as they are, `copies` augmented copies of each appended.

A copy draws its parameters once (seeded by `seed`, episode and copy number): every frame of
every camera gets the same colour / brightness / contrast / saturation change and the same
crop-shift, the instruction and segment texts one paraphrase, and, when `action_noise_std` > 0,
the actions Gaussian noise. Copies carry `augmented_from` (the original's index in the output)
and `augmentation` (the drawn parameters) in the episode metadata.

Episodes without task text are refused (an instruction paraphrased from nothing is no
instruction): `vaops validate` quarantines them and `vaops clean` drops them. The video encoder's
own log goes to `encoder.log` in the report folder.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaops.components.dataset import (
    ENCODER_LOG, DatasetError, Episode, LeRobotData, Segment, skip_empty_images, write_dataset,
)
from vaops.components.reports import markdown_table, write_report
from vaops.models.atomic import link_or_copy, write_folder_atomically

from . import transforms
from .config import AugmentConfig

PREVIEW = "preview.png"


@dataclass
class AugmentResult:
    output: Path
    originals: int
    augmented: list[dict]


def augment_episode(ep: Episode, original_index: int, copy: int, cfg: AugmentConfig) -> Episode:
    rng = np.random.default_rng([cfg.seed, original_index, copy])
    h, w = next(iter(ep.videos.values())).shape[1:3] if ep.videos else (0, 0)
    visual = transforms.draw_visual(rng, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue,
                                    int(round(cfg.max_shift * min(h, w))))
    videos = {k: transforms.apply_visual(v, visual) for k, v in ep.videos.items()}
    texts = {}
    if cfg.paraphrase:
        for text in sorted(set(ep.frame_tasks) | {s.action_text for s in ep.meta.action_config}):
            texts[text] = transforms.paraphrase(text, rng)
    arrays = dict(ep.arrays)
    if cfg.action_noise_std > 0:
        for key in cfg.noise_fields:
            arrays[key] = transforms.add_noise(arrays[key], cfg.action_noise_std, rng)
    params = {"copy": copy, "seed": cfg.seed, **visual.as_dict(), "paraphrases": texts,
              "action_noise_std": cfg.action_noise_std}
    meta = dataclasses.replace(
        ep.meta, augmented_from=original_index, augmentation=params,
        action_config=[Segment(s.start_frame, s.end_frame, texts.get(s.action_text, s.action_text))
                       for s in ep.meta.action_config])
    return Episode(meta, arrays, videos, [texts.get(t, t) for t in ep.frame_tasks])


def run(cfg: AugmentConfig) -> AugmentResult:
    if cfg.copies < 0:
        raise ValueError(f"copies={cfg.copies}: must be >= 0")
    if cfg.action_noise_std < 0:
        raise ValueError(f"action_noise_std={cfg.action_noise_std}: must be >= 0")
    data = LeRobotData(cfg.dataset)
    missing = [k for k in cfg.noise_fields if cfg.action_noise_std > 0 and k not in data.array_keys]
    if missing:
        raise ValueError(f"noise_fields {missing} are not numeric features of {cfg.dataset} ({data.array_keys})")
    originals = [m.episode_index for m in data.episodes]
    _require_task_text(data)
    augmented: list[dict] = []

    def episodes() -> Iterator[Episode]:
        for ep_index in originals:
            yield data.episode(ep_index)
        for copy in range(cfg.copies):
            for out_index, ep_index in enumerate(originals):
                ep = augment_episode(data.episode(ep_index), out_index, copy, cfg)
                augmented.append({"episode_index": len(originals) * (1 + copy) + out_index,
                                  "augmented_from": out_index, **(ep.meta.augmentation or {})})
                yield ep

    total = len(originals) * (1 + cfg.copies)
    if cfg.copies == 0:  # the originals only: linked, not decoded and re-encoded (minutes per 100 episodes)
        out = write_folder_atomically(cfg.output, lambda tmp: shutil.copytree(
            data.root, tmp, dirs_exist_ok=True, copy_function=link_or_copy, ignore=skip_empty_images(data.root)))
    with tempfile.TemporaryDirectory(prefix="vaops-augment-") as logs:
        log = Path(logs) / ENCODER_LOG
        if cfg.copies > 0:
            out = write_dataset(cfg.output, episodes(), fps=data.fps, features=data.user_features(),
                                robot_type=data.robot_type, vcodec=cfg.vcodec, total=total, desc="write augmented",
                                log_path=log, workers=cfg.workers)
        result = AugmentResult(Path(out), len(originals), augmented)
        output = LeRobotData(out)
        # Without copies (the demo's `augment_copies=0`) there is nothing to compare: no sheet, and
        # no image in the Markdown (report.html showed a broken one).
        preview = bool(output.video_keys and augmented)
        extra = {PREVIEW: lambda path: _preview(output, result, path)} if preview else {}
        if log.exists():
            extra[ENCODER_LOG] = lambda path: shutil.copyfile(log, path)
        write_report(cfg.report_dir, {"dataset": cfg.dataset, "output": cfg.output,
                                      "config": dataclasses.asdict(cfg), "originals": len(originals),
                                      "augmented": augmented}, _markdown(cfg, result, preview), extra=extra)
    return result


def _require_task_text(data: LeRobotData) -> None:
    for m in data.episodes:
        texts = data.task_texts(data.frames(m.episode_index)["task_index"])
        empty = [t for t, text in enumerate(texts) if not text.strip()]
        if empty:
            raise DatasetError(f"{data.data_file(m.episode_index)}: episode {m.episode_index} has no task text in "
                               f"{len(empty)} frames (first: frame {empty[0]}); `vaops validate` quarantines it and "
                               f"`vaops clean` drops it")


def _preview(data: LeRobotData, r: AugmentResult, path: Path, rows: int = 4, columns: int = 4) -> None:
    """A contact sheet: per row one original and its first augmented copy at evenly spaced frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = data.video_keys[0]
    picks = r.augmented[:rows]
    fig, axes = plt.subplots(2 * len(picks), columns, figsize=(2 * columns, 1.6 * 2 * len(picks)), squeeze=False)
    for i, a in enumerate(picks):
        for j, (ep, label) in enumerate(((a["augmented_from"], "original"), (a["episode_index"], "augmented"))):
            frames = data.video(ep, key)
            for k, t in enumerate(np.linspace(0, len(frames) - 1, columns).astype(int)):
                ax = axes[2 * i + j, k]
                ax.imshow(frames[t])
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"ep {ep} {label} t={t}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(cfg: AugmentConfig, r: AugmentResult, preview: bool) -> str:
    rows = [[a["episode_index"], a["augmented_from"], f"{a['brightness']:.2f}", f"{a['contrast']:.2f}",
             f"{a['saturation']:.2f}", f"{a['hue']:+.3f}", tuple(a["shift"]),
             "; ".join(a["paraphrases"].values())] for a in r.augmented]
    return (f"# Augmentation of `{cfg.dataset}`\n\n{r.originals} originals kept, {len(r.augmented)} augmented "
            f"copies appended (seed {cfg.seed}). Output: `{cfg.output}`.\n\n"
            + (f"![originals and copies]({PREVIEW})\n\n" if preview else "")
            + markdown_table(["episode", "from", "brightness", "contrast", "saturation", "hue", "shift",
                              "paraphrases"], rows))
