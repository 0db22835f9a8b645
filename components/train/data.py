"""The post-training loader over the released latent dataset layout (MODEL.md).

```
meta/info.json             chunks_size (episodes per chunk folder)
meta/episodes.jsonl        v2.1 rows (or meta/episodes/**/*.parquet, v3.0): episode_index, length,
                           action_config: [{start_frame, end_frame, action_text}, ...]
meta/norm_stats.json       {"q01": [30], "q99": [30]} per model action channel (+ "robot": the adapter)
data/**/*.parquet          episode_index, frame_index, action (the robot's own action vector, whose
                           entries land on the preset's `used_action_channels`)
latents/chunk-XXX/<camera key>/episode_XXXXXX_<start>_<end>.pth
                           {latent [f*h*w, C] bf16, latent_num_frames/height/width, text_emb [L, D],
                            frame_ids, ...}, one file per camera
empty_emb.pt               the empty-prompt embedding [L, D]
```
A segment becomes one deterministic sample: video latents in the preset's camera layout, the
actions aligned to latent frames in the model's 30 normalised channels with their channel mask,
and the padded text embedding. With `max_latent_frames`, a longer segment gives a window of that
many latent frames, its start drawn per visit from (seed, visit) alone (`window_start`). Everything
else random (noise, timesteps, text dropout, noisy history, chunk and attention window) is drawn in
the training step from a seeded generator, so that a resumed run sees exactly the draws of an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vaops.components.encode.adapter import ROBOTS, RobotAdapter, get_robot, to_model_channels
from vaops.components.encode.layout import EMPTY_EMB_FILE, NORM_STATS_FILE, latent_path
from vaops.models.atomic import read_json
from vaops.models.config import Preset
from vaops.models.observation import compose_layout
from vaops.models.policy import normalize_actions

log = logging.getLogger(__name__)

ACTION_CLIP = 1.5


@dataclass(frozen=True)
class Segment:
    episode: int
    start: int
    end: int
    files: tuple[Path, ...]  # one latent file per preset camera, in the preset's camera order


@dataclass
class Sample:
    latents: torch.Tensor  # [C, F, H, W] float32, the preset's camera layout
    actions: torch.Tensor  # [A, F, N, 1] float32, normalised model channels (unused and the segment's frame 0 zero)
    action_mask: torch.Tensor  # [A, F, N, 1] bool, the used channels
    text_emb: torch.Tensor  # [text_len, D] bfloat16, zero-padded

    def frames(self, start: int, count: int) -> Sample:
        """Latent frames `start` .. `start + count - 1`: video, actions and mask alike. Copies, so that
        a loader worker sends the window, not the storage of a preloaded whole sample."""
        span = slice(start, start + count)
        return Sample(self.latents[:, span].contiguous(), self.actions[:, span].contiguous(),
                      self.action_mask[:, span].contiguous(), self.text_emb)


@dataclass
class Batch:
    latents: torch.Tensor  # [B, C, F, H, W]
    actions: torch.Tensor  # [B, A, F, N, 1]
    action_mask: torch.Tensor  # [B, A, F, N, 1]
    text_emb: torch.Tensor  # [B, text_len, D]

    def pin_memory(self) -> Batch:
        """Called by the DataLoader (pin_memory=True) so host-to-GPU copies can overlap."""
        return Batch(self.latents.pin_memory(), self.actions.pin_memory(), self.action_mask.pin_memory(),
                     self.text_emb.pin_memory())


# ----- metadata -----

def read_norm_stats(root: Path, action_dim: int) -> dict:
    """`{"q01": [30], "q99": [30], ...}`; the encode stage also names its robot adapter ("robot")."""
    path = root / NORM_STATS_FILE
    raw = read_json(path, "action normalisation statistics (q01/q99 per model channel)")
    try:
        q01, q99 = [float(x) for x in raw["q01"]], [float(x) for x in raw["q99"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected {{'q01': [{action_dim} numbers], 'q99': [...]}} ({e!r})") from None
    if len(q01) != action_dim or len(q99) != action_dim:
        raise ValueError(f"{path}: q01/q99 must have {action_dim} entries (model channels), "
                         f"got {len(q01)}/{len(q99)}")
    return {**raw, "q01": q01, "q99": q99}


def robot_adapter(stats: dict, preset: Preset, source: str) -> RobotAdapter:
    """The adapter the encode stage recorded; for datasets without one (the released RoboTwin
    dataset), the known robot whose channels are the preset's, else the preset's channels as they
    are (no EEF poses)."""
    used = tuple(preset.used_action_channels)
    if "robot" in stats:
        try:
            adapter = get_robot(stats["robot"])
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        if adapter.channels != used:
            raise ValueError(f"{source}: robot {adapter.name!r} fills model channels {list(adapter.channels)}, "
                             f"preset {preset.name!r} uses {list(used)}")
        return adapter
    return next((r for r in ROBOTS.values() if r.channels == used), RobotAdapter(preset.name, used))


def read_episodes(root: Path) -> list[dict]:
    """Episode rows from meta/episodes.jsonl (v2.1) or meta/episodes/**/*.parquet (v3.0)."""
    jsonl = root / "meta" / "episodes.jsonl"
    if jsonl.is_file():
        rows = []
        for i, line in enumerate(jsonl.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{jsonl}:{i}: not valid JSON ({e})") from None
        return rows
    files = sorted((root / "meta" / "episodes").rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root / 'meta'}: neither episodes.jsonl (v2.1) nor episodes/*.parquet (v3.0)")
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default").to_pylist()


def read_actions(root: Path) -> dict[int, np.ndarray]:
    """Every episode's actions `[T, n]` (float64, by frame index) from the data parquet files."""
    files = sorted((root / "data").rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root / 'data'}: no parquet files with actions")
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for f in files:
        try:
            table = pq.read_table(f, columns=["episode_index", "frame_index", "action"])
        except (pa.ArrowInvalid, KeyError) as e:
            raise ValueError(f"{f}: needs columns episode_index, frame_index, action ({e})") from None
        col = table.column("action").combine_chunks()
        if not pa.types.is_list(col.type) and not pa.types.is_fixed_size_list(col.type):
            raise ValueError(f"{f}: column 'action' must be a list of floats per frame, got {col.type}")
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        if len(col) and flat.size % len(col):
            raise ValueError(f"{f}: rows of column 'action' differ in length")
        actions = flat.reshape(len(col), -1)
        episodes = table.column("episode_index").to_numpy()
        frames = table.column("frame_index").to_numpy()
        for ep in np.unique(episodes):
            sel = episodes == ep
            parts.setdefault(int(ep), []).append((frames[sel], actions[sel]))
    out = {}
    for ep, chunks in parts.items():
        frames = np.concatenate([c[0] for c in chunks])
        actions = np.concatenate([c[1] for c in chunks])
        order = np.argsort(frames, kind="stable")
        frames, actions = frames[order], actions[order]
        if not np.array_equal(frames, np.arange(len(frames))):
            raise ValueError(f"{root / 'data'}: episode {ep} frame_index is not 0..{len(frames) - 1} without gaps")
        out[ep] = actions
    return out


def index_segments(root: Path, preset: Preset) -> list[Segment]:
    """Every `action_config` segment with latents for all the preset's cameras (others are skipped,
    as upstream does); an episode without `action_config` is one segment."""
    info = read_json(root / "meta" / "info.json", "dataset info")
    chunks_size = int(info.get("chunks_size", 1000))
    segments, missing = [], []
    for row in read_episodes(root):
        try:
            ep = int(row["episode_index"])
            configs = row.get("action_config") or [{"start_frame": 0, "end_frame": int(row["length"])}]
            bounds = [(int(c["start_frame"]), int(c["end_frame"])) for c in configs]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{root / 'meta'}: episode row {row.get('episode_index')!r} lacks {e}") from None
        for start, end in bounds:
            files = tuple(latent_path(root, chunks_size, c.key, ep, start, end) for c in preset.cameras)
            if all(f.is_file() for f in files):
                segments.append(Segment(ep, start, end, files))
            else:
                missing.append(next(f for f in files if not f.is_file()))
    if not segments:
        example = f" (e.g. {missing[0]})" if missing else ""
        raise FileNotFoundError(f"{root}: no segment has latents for cameras "
                                f"{[c.key for c in preset.cameras]}{example}")
    if missing:
        log.warning("%s: %d segments lack latents for some camera and are skipped (first: %s)",
                    root, len(missing), missing[0])
    return segments


# ----- one segment -> arrays -----

def align_actions(episode_actions: np.ndarray, frame_ids: Sequence[int], latent_frames: int, preset: Preset,
                  adapter: RobotAdapter, q01: torch.Tensor, q99: torch.Tensor, source: str) -> torch.Tensor:
    """Actions at the original rate -> model space `[A, F, N, 1]`.

    Latent frame 0 is the first sampled frame alone (the VAE's causal first frame), so it has no
    actions (zero, as the inference engine holds it). Latent frame k >= 1 carries the N actions
    executed from sampled frame 4(k-1) to 4k: indices `frame_ids[0] + (k-1)N ... + kN - 1`. EEF
    poses are taken relative to `frame_ids[0]` (the adapter's), then normalised per channel and
    clipped to [-1.5, 1.5]; unused channels are zero.
    """
    ids = np.asarray(frame_ids, dtype=np.int64)
    if len(ids) != (latent_frames - 1) * preset.frames_per_latent + 1:
        raise ValueError(f"{source}: {len(ids)} frame_ids for {latent_frames} latent frames; expected "
                         f"{(latent_frames - 1) * preset.frames_per_latent + 1}")
    strides = np.unique(np.diff(ids))
    if len(strides) != 1 or strides[0] < 1:
        raise ValueError(f"{source}: frame_ids must be evenly spaced, got strides {strides.tolist()}")
    n = int(strides[0]) * preset.frames_per_latent
    if n != preset.action_per_frame:
        raise ValueError(f"{source}: frame stride {int(strides[0])} gives {n} actions per latent frame; preset "
                         f"{preset.name!r} expects {preset.action_per_frame}")
    need = (latent_frames - 1) * n
    raw = episode_actions[ids[0]:ids[0] + need]
    if len(raw) < need:
        raise ValueError(f"{source}: needs {need} actions from frame {ids[0]}, the episode has {len(raw)}")
    try:
        model_actions = to_model_channels(raw, adapter)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    dim = preset.transformer.action_dim
    out = torch.zeros(dim, latent_frames * n, dtype=torch.float32)
    out[:, n:] = torch.from_numpy(model_actions.T).float()
    out = normalize_actions(out, q01, q99).clamp(-ACTION_CLIP, ACTION_CLIP)
    out[~torch.tensor(preset.action_mask)] = 0
    out[:, :n] = 0
    return out.view(dim, latent_frames, n, 1)


def pad_text(emb: torch.Tensor, length: int, source: str) -> torch.Tensor:
    if emb.dim() == 3 and emb.shape[0] == 1:
        emb = emb[0]
    if emb.dim() != 2 or emb.shape[0] > length:
        raise ValueError(f"{source}: text embedding must be [L <= {length}, D], got {tuple(emb.shape)}")
    out = torch.zeros(length, emb.shape[1], dtype=torch.bfloat16)
    out[:emb.shape[0]] = emb.to(torch.bfloat16)
    return out


def window_start(frames: int, window: int, seed: int, visit: int) -> int:
    """Where a visit's window of `window` latent frames starts in a segment of `frames`: drawn from
    (seed, visit) alone, so the loader's workers and a resumed run draw the same. The start is drawn
    uniformly from -(window-1) .. frames-1 and clamped into the segment: every frame is then in at
    least `window` of the frames+window-1 equally likely draws. Uniform starts would put the ends in
    1 of frames-window+1: at 40 frames and windows of 16, the episode's first frame (where every
    inference episode starts) 16 times less often than its middle."""
    if frames <= window:
        return 0
    mixed = np.random.SeedSequence([seed, visit]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator().manual_seed(int(mixed) & (2**63 - 1))
    drawn = int(torch.randint(1 - window, frames, (1,), generator=g))
    return min(max(drawn, 0), frames - window)


def load_latent_file(path: Path) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable latent file of tensors, numbers and lists ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict, got {type(data).__name__}")
    return data


def camera_latent(data: dict, path: Path, expected_hw: tuple[int, int], channels: int) -> torch.Tensor:
    """`latent [f*h*w, C]` -> `[C, f, h, w]` float32."""
    try:
        f, h, w = (int(data[k]) for k in ("latent_num_frames", "latent_height", "latent_width"))
        flat = data["latent"]
    except KeyError as e:
        raise ValueError(f"{path}: field {e} is missing") from None
    if (h, w) != expected_hw:
        raise ValueError(f"{path}: latent is {h}x{w}, the preset's camera needs {expected_hw[0]}x{expected_hw[1]}")
    if tuple(flat.shape) != (f * h * w, channels):
        raise ValueError(f"{path}: latent has shape {tuple(flat.shape)}, expected [{f}*{h}*{w}, {channels}]")
    return flat.float().view(f, h, w, channels).permute(3, 0, 1, 2)


class LatentDataset(torch.utils.data.Dataset):
    def __init__(self, root: str | Path, preset: Preset, max_latent_frames: int | None = None,
                 norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None, seed: int = 0):
        """`norm`: the (q01, q99) the actions are normalised with; None: the dataset's own. `seed`
        (the run's) draws the windows of segments longer than `max_latent_frames`."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: latent dataset directory does not exist")
        self.preset = preset
        cfg = preset.transformer
        stats = read_norm_stats(self.root, cfg.action_dim)
        q01, q99 = norm if norm is not None else (stats["q01"], stats["q99"])
        self.q01, self.q99 = (torch.tensor(q, dtype=torch.float32) for q in (q01, q99))
        self.adapter = robot_adapter(stats, preset, str(self.root / NORM_STATS_FILE))
        self.max_latent_frames = max_latent_frames
        self.seed = seed
        self.segments = index_segments(self.root, preset)
        self.actions = read_actions(self.root)
        lost = sorted({s.episode for s in self.segments} - set(self.actions))
        if lost:
            raise ValueError(f"{self.root / 'data'}: no actions for episodes {lost[:10]}")
        empty = self.root / EMPTY_EMB_FILE
        if not empty.is_file():
            raise FileNotFoundError(f"{empty}: the empty-prompt embedding is missing")
        self.text_len = preset.text_encoder.max_length
        self.empty_emb = pad_text(torch.load(empty, map_location="cpu", weights_only=True), self.text_len, str(empty))
        if self.empty_emb.shape[1] != cfg.text_dim:
            raise ValueError(f"{empty}: text width {self.empty_emb.shape[1]}, the transformer expects {cfg.text_dim}")
        s = preset.vae.scale_factor_spatial
        self.camera_hw = {c.key: (c.height // s, c.width // s) for c in preset.cameras}
        self._cache: list[Sample] | None = None  # preload()

    def __len__(self) -> int:
        return len(self.segments)

    def preload(self, progress=None) -> None:
        """Read every sample once into memory (the loader's workers then share it). For datasets that
        fit: the small recipe's 640 ALOHA episodes are 100 MB, read in seconds instead of 12 ms a sample
        per step, which at micro-batch 128 needed more loader workers than a GPU node's cores."""
        indices = range(len(self.segments))
        self._cache = [self._read(i) for i in (progress(indices) if progress else indices)]

    def __getitem__(self, visit: int) -> Sample:
        """`visit`: `epoch * len(self) + index`, as `ResumableSampler` yields (a bare index is its first
        epoch's visit); a segment longer than `max_latent_frames` gives the window this visit draws."""
        index = visit % len(self.segments)
        sample = self._cache[index] if self._cache is not None else self._read(index)
        f, window = sample.latents.shape[1], self.max_latent_frames
        if window is None or f <= window:
            return sample
        return sample.frames(window_start(f, window, self.seed, visit), window)

    def check_rate(self) -> None:
        """A preset with a fixed control rate refuses latents encoded from data at another rate (one
        file read, before any model is built)."""
        want = self.preset.control_fps
        seg = self.segments[0]
        got = load_latent_file(seg.files[0]).get("ori_fps")
        if want is not None and got is not None and float(got) != want:
            raise ValueError(f"{seg.files[0]}: encoded from {got} fps data; preset {self.preset.name!r} runs its "
                             f"robot at {want} actions/s")

    def _read(self, index: int) -> Sample:
        seg = self.segments[index]
        cfg = self.preset.transformer
        per_camera, metas = {}, []
        for cam, path in zip(self.preset.cameras, seg.files):
            data = load_latent_file(path)
            per_camera[cam.key] = camera_latent(data, path, self.camera_hw[cam.key], cfg.in_channels)[None]
            metas.append(data)
        frames = {v.shape[2] for v in per_camera.values()}
        if len(frames) != 1:
            raise ValueError(f"{seg.files[0].parent.parent}: cameras of episode {seg.episode} segment "
                             f"{seg.start}-{seg.end} have different latent frame counts {sorted(frames)}")
        latents = compose_layout(per_camera, self.preset)[0]
        f = latents.shape[1]
        source = str(seg.files[0])
        if f < 2:
            raise ValueError(f"{source}: {f} latent frame; training needs at least 2")
        if "frame_ids" not in metas[0] or "text_emb" not in metas[0]:
            raise ValueError(f"{source}: fields 'frame_ids' and 'text_emb' are required")
        actions = align_actions(self.actions[seg.episode], list(metas[0]["frame_ids"]), f, self.preset,
                                self.adapter, self.q01, self.q99, source)
        text = pad_text(metas[0]["text_emb"], self.text_len, source)
        if text.shape[1] != cfg.text_dim:
            raise ValueError(f"{source}: text width {text.shape[1]}, the transformer expects {cfg.text_dim}")
        mask = torch.zeros(cfg.action_dim, 1, 1, 1, dtype=torch.bool)
        mask[list(self.preset.used_action_channels)] = True
        return Sample(latents.contiguous(), actions, mask.expand(-1, f, actions.shape[2], 1).contiguous(), text)


def collate(samples: list[Sample]) -> Batch:
    """Stack samples, keeping the leading latent frames common to all (segments differ in length)."""
    f = min(s.latents.shape[1] for s in samples)
    return Batch(torch.stack([s.latents[:, :f] for s in samples]),
                 torch.stack([s.actions[:, :f] for s in samples]),
                 torch.stack([s.action_mask[:, :f] for s in samples]),
                 torch.stack([s.text_emb for s in samples]))


class ResumableSampler(torch.utils.data.Sampler[int]):
    """An endless stream of visits `epoch * size + index` (`LatentDataset.__getitem__` takes the index
    back and draws a long segment's window from the visit): a seeded permutation per epoch, split
    across ranks, starting at this rank's `start`-th visit (the data position saved with a checkpoint)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world, start
        self.per_rank = math.ceil(size / world)

    def epoch_indices(self, epoch: int) -> list[int]:
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        perm = (perm * math.ceil(self.per_rank * self.world / self.size))[:self.per_rank * self.world]
        return perm[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from (epoch * self.size + i for i in self.epoch_indices(epoch)[offset:])
            epoch, offset = epoch + 1, 0
