"""Per-episode video: the real camera beside the model's imagined video (decoded latents).

The two are aligned chunk by chunk: a chunk's imagined clip spans the whole chunk, so the real
frame `k` of a chunk that would give `expected` frames shows imagined frame
`k * T / expected` (how many frames the server decodes per chunk is its own business).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import imageio.v2 as imageio
import numpy as np
from PIL import Image, ImageDraw

from vaops.models.atomic import write_file_atomically

from .episode import ChunkFrames

TITLE_H = 14
MIN_HEIGHT = 192  # tiny sim cameras are scaled up to stay watchable


def _fit_height(frame: np.ndarray, height: int) -> np.ndarray:
    frame = np.asarray(frame, np.uint8)
    if frame.shape[0] == height:
        return frame
    width = max(1, round(frame.shape[1] * height / frame.shape[0]))
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))


def _titled(frame: np.ndarray, title: str) -> np.ndarray:
    bar = Image.new("RGB", (frame.shape[1], TITLE_H))
    ImageDraw.Draw(bar).text((3, 1), title, fill=(255, 255, 255))
    return np.concatenate([np.asarray(bar), frame], axis=0)


def side_by_side(chunks: Sequence[ChunkFrames], caption: str = "") -> list[np.ndarray]:
    """One output frame per real frame: real | imagined, each scaled to one height, titled."""
    reals = [f for c in chunks for f in c.real]
    if not reals:
        raise ValueError("an episode video needs at least one real frame")
    height = max(MIN_HEIGHT, reals[0].shape[0])
    real_w = _fit_height(reals[0], height).shape[1]
    first_imagined = next((c.imagined for c in chunks if c.imagined is not None and len(c.imagined)), None)
    im_w = real_w if first_imagined is None else _fit_height(first_imagined[0], height).shape[1]
    blank = np.zeros((height, im_w, 3), np.uint8)
    out = []
    for c in chunks:
        for k, frame in enumerate(c.real):
            left = _titled(_fit_height(frame, height)[:, :real_w], f"real {caption}".strip())
            if c.imagined is not None and len(c.imagined):
                idx = min(len(c.imagined) - 1, k * len(c.imagined) // max(c.expected, 1))
                right = _titled(_fit_height(c.imagined[idx], height)[:, :im_w], "imagined")
            else:
                right = _titled(blank, "imagined: not sent")
            if right.shape[1] < im_w:
                right = np.pad(right, ((0, 0), (0, im_w - right.shape[1]), (0, 0)))
            out.append(np.concatenate([left, right], axis=1))
    return out


def ffmpeg_available() -> bool:
    """Whether imageio can reach an ffmpeg binary (imageio-ffmpeg's bundled one, or IMAGEIO_FFMPEG_EXE)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return False
    return True


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float) -> Path:
    """`path` as H.264 mp4 where ffmpeg is at hand, else as an animated GIF beside it (`.gif`): a GPU
    node's image without ffmpeg still gets its episode videos. Returns the path written."""
    if ffmpeg_available():
        return write_mp4(path, frames, fps)
    return write_gif(Path(path).with_suffix(".gif"), frames, fps)


def write_gif(path: Path, frames: Sequence[np.ndarray], fps: float) -> Path:
    """An animated GIF (Pillow), written to a temp file and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]

    def write(tmp: Path) -> None:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(round(1000 / fps)), loop=0)

    write_file_atomically(path, write)
    return path


def write_mp4(path: Path, frames: Sequence[np.ndarray], fps: float) -> Path:
    """H.264 mp4, written to a temp file and renamed; frames are padded to even sizes (yuv420p)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    ph, pw = h + h % 2, w + w % 2

    def write(tmp: Path) -> None:
        with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1, quality=7,
                                ffmpeg_log_level="error", pixelformat="yuv420p") as writer:
            for frame in frames:
                if frame.shape[:2] != (h, w):
                    raise ValueError(f"video frames differ in size: {frame.shape[:2]} vs {(h, w)}")
                writer.append_data(np.pad(frame, ((0, ph - h), (0, pw - w), (0, 0))))

    write_file_atomically(path, write)
    return path
