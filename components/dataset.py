"""LeRobot datasets as the data stages read and write them.

On disk a dataset is what lerobot 0.4.4 writes (codebase v3.0: `data/`, `videos/`,
`meta/info.json`, `meta/tasks.parquet`, `meta/episodes/...parquet`) plus the post-training
episode metadata of the released LingBot-VA dataset:

- `action_config`: a list of `{start_frame, end_frame, action_text}` segments per episode,
  stored as a column of lerobot's episodes parquet (where lerobot's own v2.1 -> v3.0
  converter puts every legacy `episodes.jsonl` field) and mirrored, together with
  `episode_index`, `tasks` and `length`, as `meta/episodes.jsonl` rows: the released v2.1
  layout, for tools that read it.
- `success`, `seed`, `augmented_from`, `augmentation`: provenance of sim demonstrations and
  augmented copies (null where unknown).

`write_dataset` gives every episode its own parquet and mp4 files (lerobot's file-size limits
set to ~0), as in the released layout: one broken video then only loses its own episode, and
DVC stores unchanged episodes once across dataset versions. Readers also accept lerobot's
shared files (several episodes per parquet or mp4).

Writers build the whole dataset in a temporary sibling folder and rename it into place. The
encoder's own log lines (SVT-AV1 and FFmpeg print a dozen per video file, to the process's stderr)
go to a log file the caller names, the console keeps the progress bar; lerobot's temporary `images/`
folder is not left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vaops.models.atomic import read_json, write_folder_atomically  # noqa: E402

CODEBASE_VERSION = "v3.0"
EPISODES_JSONL = "meta/episodes.jsonl"
# Below any real file size, so lerobot starts a new parquet / mp4 file for every episode.
PER_EPISODE_FILE_MB = 1e-6
MIN_SVTAV1_SIZE = 32
# Where a writing stage keeps the video encoder's own log lines (in its report folder).
ENCODER_LOG = "encoder.log"
EXTRA_COLUMNS = ("action_config", "success", "seed", "augmented_from", "augmentation")

# lerobot's own bookkeeping columns (lerobot.datasets.utils.DEFAULT_FEATURES in 0.4.4).
DEFAULT_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")


def load_info(root: Path) -> dict:
    """meta/info.json as lerobot.datasets.utils.load_info reads it (shapes as tuples). Not imported from
    there: that module pulls torch, torchvision and datasets (6-11 s on 2 cores) into every stage
    process that only reads metadata; tests/components/test_dataset_writer.py checks both agree."""
    info = read_json(root / "meta" / "info.json", "the dataset's info")
    for feature in info["features"].values():
        feature["shape"] = tuple(feature["shape"])
    return info


def load_tasks(root: Path):
    """meta/tasks.parquet as lerobot.datasets.utils.load_tasks reads it (a DataFrame indexed by task)."""
    return pq.read_table(root / "meta" / "tasks.parquet").to_pandas()


_SEGMENT_TYPE = pa.list_(pa.struct([("start_frame", pa.int64()), ("end_frame", pa.int64()),
                                    ("action_text", pa.string())]))
_EXTRA_TYPES = {"action_config": _SEGMENT_TYPE, "success": pa.bool_(), "seed": pa.int64(),
                "augmented_from": pa.int64(), "augmentation": pa.string()}


class DatasetError(ValueError):
    """A dataset that cannot be read; the message names the file, episode and field."""


@dataclass(frozen=True)
class Segment:
    start_frame: int
    end_frame: int
    action_text: str


@dataclass
class EpisodeMeta:
    episode_index: int
    length: int
    tasks: list[str]
    action_config: list[Segment] = field(default_factory=list)
    success: bool | None = None
    seed: int | None = None
    augmented_from: int | None = None
    augmentation: dict | None = None

    def jsonl_row(self) -> dict:
        row = {"episode_index": self.episode_index, "tasks": list(self.tasks), "length": self.length,
               "action_config": [dataclasses.asdict(s) for s in self.action_config]}
        for key in ("success", "seed", "augmented_from", "augmentation"):
            if getattr(self, key) is not None:
                row[key] = getattr(self, key)
        return row


@dataclass
class Episode:
    """One episode in memory: numeric features `[T, ...]`, videos uint8 `[T, H, W, 3]`, and
    the task text of every frame."""

    meta: EpisodeMeta
    arrays: dict[str, np.ndarray]
    videos: dict[str, np.ndarray]
    frame_tasks: list[str]
    # Cameras whose frames are exactly those of an existing single-episode mp4: the writer keeps
    # that file's bytes instead of its own re-encoding, so untouched videos lose no quality.
    video_sources: dict[str, Path] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.frame_tasks)


def _segments(raw) -> list[Segment]:
    return [Segment(int(s["start_frame"]), int(s["end_frame"]), str(s["action_text"])) for s in raw or []]


class LeRobotData:
    """Read access to a v3.0 LeRobot dataset directory, episode by episode."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise DatasetError(f"{info_path}: missing (not a LeRobot dataset directory)")
        self.info = load_info(self.root)
        version = self.info.get("codebase_version")
        if version != CODEBASE_VERSION:
            raise DatasetError(f"{info_path}: codebase_version is {version!r}; this stage reads "
                               f"{CODEBASE_VERSION} (convert with `vaops ingest`)")
        self.episodes = self._load_episodes()

    @property
    def fps(self) -> int:
        return int(self.info["fps"])

    @property
    def features(self) -> dict:
        return self.info["features"]

    @property
    def robot_type(self) -> str | None:
        return self.info.get("robot_type")

    @property
    def video_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] == "video"]

    @property
    def array_keys(self) -> list[str]:
        """The recorded numeric features (state, action, ...), lerobot's bookkeeping excluded."""
        return [k for k, ft in self.features.items()
                if ft["dtype"] not in ("video", "image", "string") and k not in DEFAULT_FEATURES]

    def user_features(self) -> dict:
        """Feature specs as `LeRobotDataset.create` takes them."""
        out = {}
        for key, ft in self.features.items():
            if key in DEFAULT_FEATURES:
                continue
            spec = {k: v for k, v in ft.items() if k not in ("info", "fps")}
            spec["shape"] = tuple(spec["shape"])
            out[key] = spec
        return out

    def _load_episodes(self) -> list[EpisodeMeta]:
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise DatasetError(f"{self.root / 'meta' / 'episodes'}: no episodes parquet (empty dataset?)")
        rows = []
        for path in files:
            try:
                table = pq.read_table(path)
            except (OSError, pa.ArrowInvalid) as e:
                raise DatasetError(f"{path}: unreadable episodes metadata ({e})") from None
            rows += table.drop_columns([c for c in table.column_names if c.startswith("stats/")]).to_pylist()
        rows.sort(key=lambda r: r["episode_index"])
        self._rows = {int(r["episode_index"]): r for r in rows}
        legacy = self._jsonl_rows()
        metas = []
        for r in rows:
            idx = int(r["episode_index"])
            raw_segments = r.get("action_config") if "action_config" in r else legacy.get(idx, {}).get("action_config")
            aug = r.get("augmentation")
            metas.append(EpisodeMeta(
                episode_index=idx, length=int(r["length"]), tasks=list(r["tasks"]),
                action_config=_segments(raw_segments), success=r.get("success"), seed=r.get("seed"),
                augmented_from=r.get("augmented_from"),
                augmentation=json.loads(aug) if isinstance(aug, str) else aug))
        return metas

    def _jsonl_rows(self) -> dict[int, dict]:
        path = self.root / EPISODES_JSONL
        if not path.is_file():
            return {}
        rows = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows[int(row["episode_index"])] = row
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise DatasetError(f"{path}:{n}: malformed episodes row ({e})") from None
        return rows

    def task_names(self) -> dict[int, str]:
        """task_index -> task text (lerobot's `meta/tasks.parquet`), read once."""
        if not hasattr(self, "_task_names"):
            try:
                tasks = load_tasks(self.root)
            except (OSError, pa.ArrowInvalid, ValueError) as e:
                raise DatasetError(f"{self.root / 'meta' / 'tasks.parquet'}: unreadable ({e})") from None
            self._task_names = {int(i): str(t) for t, i in zip(tasks.index, tasks["task_index"])}
        return self._task_names

    def task_texts(self, task_indices) -> list[str]:
        """The task text of each frame's task_index; "" where the index names no task."""
        names = self.task_names()
        return [names.get(int(i), "") for i in task_indices]

    def episode_meta(self, index: int) -> EpisodeMeta:
        for ep in self.episodes:
            if ep.episode_index == index:
                return ep
        raise DatasetError(f"{self.root}: no episode {index}")

    def data_file(self, index: int) -> Path:
        r = self._rows[index]
        return self.root / self.info["data_path"].format(chunk_index=r["data/chunk_index"],
                                                          file_index=r["data/file_index"])

    def meta_file(self, index: int) -> Path:
        """The episodes parquet holding episode `index`'s metadata (its action_config among it)."""
        r = self._rows[index]
        return self.root / "meta" / "episodes" / (f"chunk-{r['meta/episodes/chunk_index']:03d}/"
                                                  f"file-{r['meta/episodes/file_index']:03d}.parquet")

    def video_file(self, index: int, key: str) -> Path:
        r = self._rows[index]
        if f"videos/{key}/chunk_index" not in r:
            raise DatasetError(f"{self.root}: episode {index} has no video entry for camera {key!r}")
        return self.root / self.info["video_path"].format(
            video_key=key, chunk_index=r[f"videos/{key}/chunk_index"], file_index=r[f"videos/{key}/file_index"])

    def frames(self, index: int):
        """The episode's parquet rows as a pandas DataFrame ordered by frame_index."""
        path = self.data_file(index)
        if not path.is_file():
            raise DatasetError(f"{path}: data parquet of episode {index} is missing")
        try:
            table = pq.read_table(path, filters=[("episode_index", "=", index)])
        except (OSError, pa.ArrowInvalid) as e:
            raise DatasetError(f"{path}: unreadable data parquet of episode {index} ({e})") from None
        return table.to_pandas().sort_values("frame_index").reset_index(drop=True)

    def arrays(self, index: int, frames=None) -> dict[str, np.ndarray]:
        df = self.frames(index) if frames is None else frames
        out = {}
        for key in self.array_keys:
            if key not in df.columns:
                raise DatasetError(f"{self.data_file(index)}: episode {index} lacks column {key!r}")
            out[key] = np.stack(df[key].to_numpy()).astype(self.features[key]["dtype"]).reshape(
                len(df), *self.features[key]["shape"])
        return out

    def standalone_video(self, index: int, key: str) -> Path | None:
        """The episode's mp4 for camera `key` when it holds this episode alone, else None."""
        path = self.video_file(index, key)
        r = self._rows[index]
        shared = any(o is not r and (o[f"videos/{key}/chunk_index"], o[f"videos/{key}/file_index"])
                     == (r[f"videos/{key}/chunk_index"], r[f"videos/{key}/file_index"]) for o in self._rows.values())
        return None if shared or float(r[f"videos/{key}/from_timestamp"]) != 0.0 else path

    def video_offset(self, index: int, key: str) -> float:
        """Where episode `index` starts in camera `key`'s mp4 (seconds; 0 for a file of its own)."""
        return float(self._rows[index][f"videos/{key}/from_timestamp"])

    def video(self, index: int, key: str, timestamps: np.ndarray | None = None) -> np.ndarray:
        """uint8 `[T, H, W, 3]` frames of camera `key` at the episode's frame timestamps."""
        path = self.video_file(index, key)
        if not path.is_file():
            raise DatasetError(f"{path}: video of camera {key!r}, episode {index} is missing")
        if timestamps is None:
            timestamps = self.frames(index)["timestamp"].to_numpy()
        offset = self.video_offset(index, key)
        # +0.1 ms: t = i/fps in float lands a hair before frame i's pts (0.7 * 10240 = 7167.99...), and
        # torchcodec then returns frame i-1 (seen on 10 fps demos); far below half a frame at any rate.
        query = [offset + float(t) + 1e-4 for t in timestamps]
        try:
            return decode_frames(path, query)
        except Exception as e:  # torchcodec and PyAV raise RuntimeError/ValueError/av.error variants
            reason = re.sub(r"(SingleStreamDecoder, )?\S+\.cpp:\d+,\s*", "", str(e)).strip()
            raise DatasetError(f"{path}: camera {key!r}, episode {index}: cannot decode ({reason})") from None

    def episode(self, index: int) -> Episode:
        """The whole episode, its videos marked as reusable where they stand alone."""
        df = self.frames(index)
        meta = self.episode_meta(index)
        frame_tasks = self.task_texts(df["task_index"])
        ts = df["timestamp"].to_numpy()
        sources = {k: p for k in self.video_keys if (p := self.standalone_video(index, k)) is not None}
        return Episode(dataclasses.replace(meta), self.arrays(index, df),
                       {k: self.video(index, k, ts) for k in self.video_keys}, frame_tasks, sources)


def _torchcodec_decoder():
    """torchcodec's decoder, or None where it cannot load (it needs the system's FFmpeg libraries,
    which GPU images often lack)."""
    try:
        from torchcodec.decoders import VideoDecoder
    except (ImportError, RuntimeError, OSError):
        return None
    return VideoDecoder


def decode_frames(path: Path, seconds: list[float]) -> np.ndarray:
    """uint8 `[T, H, W, 3]`: the frames played at `seconds`, by torchcodec (lerobot's decoder), else
    by PyAV (the FFmpeg that lerobot's writer already brings)."""
    decoder = _torchcodec_decoder()
    if decoder is not None:
        return decoder(str(path)).get_frames_played_at(seconds=seconds).data.permute(0, 2, 3, 1).numpy()
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts, frames = [], []
        for frame in container.decode(stream):
            pts.append(float(frame.pts * stream.time_base))
            frames.append(frame.to_ndarray(format="rgb24"))
    if not frames:
        raise ValueError("no video frames")
    # The frame played at t is the last one presented at or before it; lerobot's timestamps are
    # multiples of 1/fps that the stream's time base rounds either way, so within half a frame.
    pts_arr = np.asarray(pts)
    half = 0.5 * float(np.median(np.diff(pts_arr))) if len(pts) > 1 else 0.0
    idx = np.searchsorted(pts_arr, np.asarray(seconds) + half, side="right") - 1
    if (idx < 0).any() or max(seconds) > pts[-1] + 1.0:
        raise ValueError(f"timestamps {min(seconds):.3f}-{max(seconds):.3f} s outside the video's "
                         f"{pts[0]:.3f}-{pts[-1]:.3f} s")
    return np.stack([frames[i] for i in idx])


@contextlib.contextmanager
def native_stderr_to(log_path: str | Path | None) -> Iterator[None]:
    """Send what native libraries write to file descriptor 2 (SVT-AV1's `Svt[info]` lines, FFmpeg's
    `[mp4 @ ...]`) and Python's stderr to `log_path` while keeping `sys.stderr`, and so tqdm's bars,
    on the console. None: nothing is redirected."""
    if log_path is None:
        yield
        return
    import datasets.utils as hf_logging

    bars_were_off = hf_logging.are_progress_bars_disabled()
    hf_logging.disable_progress_bars()  # lerobot's writer draws a datasets "Map" bar per episode
    sys.stderr.flush()
    saved = os.dup(2)
    console = os.fdopen(os.dup(saved), "w", buffering=1)
    old_stderr = sys.stderr
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 2)
        sys.stderr = console
        try:
            yield
        finally:
            sys.stderr = old_stderr
            console.flush()
            os.dup2(saved, 2)
            os.close(saved)
            console.close()
            if not bars_were_off:
                hf_logging.enable_progress_bars()


def _is_empty_tree(root: Path) -> bool:
    """`root` holds folders only (lerobot's per-camera `images/` staging folders)."""
    return root.is_dir() and not any(p.is_file() for p in root.rglob("*"))


def _remove_empty_tree(root: Path) -> None:
    if _is_empty_tree(root):
        shutil.rmtree(root)


def skip_empty_images(root: Path):
    """copytree's `ignore`: lerobot's empty `images/` staging tree at the dataset's top level."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        return ["images"] if Path(folder) == root and "images" in names and _is_empty_tree(root / "images") else []

    return ignore


def write_dataset(dst: str | Path, episodes: Iterable[Episode], *, fps: int, features: dict,
                  robot_type: str | None, vcodec: str = "libsvtav1", total: int | None = None,
                  desc: str = "write episodes", log_path: str | Path | None = None, workers: int = 1) -> Path:
    """Write `episodes` as a new dataset at `dst` (atomically replacing it) with lerobot's
    own writer; episodes are renumbered 0..N-1 in the order given. `log_path`: where the video
    encoder's own log lines go (appended; None: the console). `workers` > 1: that many processes
    write consecutive shards of `SHARD_EPISODES` episodes, which lerobot's `aggregate_datasets`
    then joins in order (same files, same order as one process would write)."""
    dst = Path(dst)
    if workers < 1:
        raise ValueError(f"workers={workers}: need at least one")
    for key, ft in features.items():
        if ft["dtype"] == "video" and vcodec == "libsvtav1" and min(ft["shape"][:2]) < MIN_SVTAV1_SIZE:
            # SVT-AV1 dies with SIGFPE on such frames instead of raising
            raise DatasetError(f"{key}: frames {ft['shape'][0]}x{ft['shape'][1]} are below libsvtav1's "
                               f"{MIN_SVTAV1_SIZE} pixels; choose another vcodec (e.g. h264)")
    spec = _WriterSpec(fps, features, robot_type, vcodec)
    if total is not None:
        workers = min(workers, -(-total // SHARD_EPISODES))

    def build(tmp: Path) -> None:
        with native_stderr_to(log_path):
            if workers > 1:
                metas = _write_shards(tmp, episodes, spec, workers, total, desc, log_path)
            else:
                metas = _write_episodes(tmp, tqdm(episodes, total=total, desc=desc, unit="ep"), spec)
        _remove_empty_tree(tmp / "images")
        write_episode_metadata(tmp, metas)

    return write_folder_atomically(dst, build)


# Episodes per shard when several processes write: 8 episodes keep a 16-process pool's look-ahead
# in memory small (2 x 16 x 8 x 7 MB for 49 frames of 192x256) while lerobot's per-dataset setup
# (~0.1 s) stays small against the ~1.3 s per episode its writer takes (PNGs, stats, mp4).
SHARD_EPISODES = 8


@dataclass(frozen=True)
class _WriterSpec:
    fps: int
    features: dict
    robot_type: str | None
    vcodec: str


def _renumbered(ep: Episode, index: int) -> EpisodeMeta:
    if ep.length == 0:
        raise DatasetError(f"episode {ep.meta.episode_index}: no frames to write")
    return dataclasses.replace(ep.meta, episode_index=index, length=ep.length, tasks=sorted(set(ep.frame_tasks)))


def _write_episodes(tmp: Path, episodes: Iterable[Episode], spec: _WriterSpec) -> list[EpisodeMeta]:
    """One lerobot writer: `episodes` into a new dataset at `tmp` (which must exist, empty)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    tmp.rmdir()  # LeRobotDataset.create insists on creating its root itself
    ds = LeRobotDataset.create(repo_id=f"local/{tmp.name}", fps=spec.fps, features=spec.features, root=tmp,
                               robot_type=spec.robot_type, use_videos=True, vcodec=spec.vcodec)
    ds.meta.update_chunk_settings(data_files_size_in_mb=PER_EPISODE_FILE_MB,
                                  video_files_size_in_mb=PER_EPISODE_FILE_MB)
    metas: list[EpisodeMeta] = []
    sources: list[dict[str, Path]] = []
    for ep in episodes:
        metas.append(_renumbered(ep, len(metas)))
        for t in range(ep.length):
            frame = {k: v[t] for k, v in ep.arrays.items()}
            frame.update({k: v[t] for k, v in ep.videos.items()})
            frame["task"] = ep.frame_tasks[t]
            ds.add_frame(frame)
        ds.save_episode()
        sources.append(ep.video_sources)
    ds.finalize()
    if not metas:
        raise DatasetError(f"{tmp}: no episodes to write (empty dataset)")
    written = LeRobotData(tmp)
    for index, by_key in enumerate(sources):
        for key, src in by_key.items():
            shutil.copyfile(src, written.video_file(index, key))
    return metas


def _write_shard(root: str, episodes: list[Episode], spec: _WriterSpec, log_path: str | None) -> int:
    """A writer process's work: one shard dataset at `root`."""
    shard = Path(root)
    shard.mkdir()
    with native_stderr_to(log_path):  # its images/ staging tree goes with the shards folder
        _write_episodes(shard, episodes, spec)
    return len(episodes)


def _one_thread() -> None:
    # lerobot's stats and PIL's PNG encoder run per process; torch's default of one thread per core
    # in each of 16 writers would oversubscribe the node's 16 cores.
    import torch

    torch.set_num_threads(1)


def _write_shards(tmp: Path, episodes: Iterable[Episode], spec: _WriterSpec, workers: int, total: int | None,
                  desc: str, log_path: str | Path | None) -> list[EpisodeMeta]:
    """`episodes` in shards of `SHARD_EPISODES`, written by `workers` processes while this one reads
    on (at most 2 shards per process ahead), then joined into `tmp` in their order."""
    import multiprocessing
    from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, ProcessPoolExecutor, wait

    from lerobot.datasets.aggregate import aggregate_datasets

    shards = Path(tempfile.mkdtemp(prefix=f"{tmp.name}.shards-", dir=tmp.parent))
    metas: list[EpisodeMeta] = []
    roots: list[Path] = []
    running: set = set()
    log = None if log_path is None else str(log_path)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_one_thread) as pool, \
                tqdm(total=total, desc=desc, unit="ep") as bar:
            def settle(return_when) -> None:
                nonlocal running
                done, running = wait(running, return_when=return_when)
                for future in done:
                    bar.update(future.result())  # a writer's error ends the whole write here

            def submit(batch: list[Episode]) -> None:
                if len(running) >= 2 * workers:
                    settle(FIRST_COMPLETED)
                roots.append(shards / f"shard-{len(roots):05d}")
                running.add(pool.submit(_write_shard, str(roots[-1]), batch, spec, log))

            batch: list[Episode] = []
            for ep in episodes:
                metas.append(_renumbered(ep, len(metas)))
                batch.append(ep)
                if len(batch) == SHARD_EPISODES:
                    submit(batch)
                    batch = []
            if batch:
                submit(batch)
            if not metas:
                raise DatasetError(f"{tmp}: no episodes to write (empty dataset)")
            settle(ALL_COMPLETED)
        tmp.rmdir()  # aggregate_datasets creates its root itself
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its own per-shard bar
            aggregate_datasets([f"local/{r.name}" for r in roots], f"local/{tmp.name}", roots=roots,
                               aggr_root=tmp, data_files_size_in_mb=PER_EPISODE_FILE_MB,
                               video_files_size_in_mb=PER_EPISODE_FILE_MB)
    finally:
        shutil.rmtree(shards, ignore_errors=True)
    return metas


def write_episode_metadata(root: str | Path, metas: list[EpisodeMeta]) -> None:
    """Store `action_config` and provenance in lerobot's episodes parquet and mirror them as
    `meta/episodes.jsonl`."""
    root = Path(root)
    by_index = {m.episode_index: m for m in metas}
    for path in sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet")):
        table = pq.read_table(path)
        indices = [int(i) for i in table.column("episode_index").to_pylist()]
        missing = [i for i in indices if i not in by_index]
        if missing:
            raise DatasetError(f"{path}: no metadata given for episodes {missing}")
        rows = [by_index[i] for i in indices]
        table = table.drop_columns([c for c in EXTRA_COLUMNS if c in table.column_names])
        values = {
            "action_config": [[dataclasses.asdict(s) for s in m.action_config] for m in rows],
            "success": [m.success for m in rows],
            "seed": [m.seed for m in rows],
            "augmented_from": [m.augmented_from for m in rows],
            "augmentation": [None if m.augmentation is None else json.dumps(m.augmentation, sort_keys=True)
                             for m in rows],
        }
        for key in EXTRA_COLUMNS:
            table = table.append_column(pa.field(key, _EXTRA_TYPES[key]), pa.array(values[key], _EXTRA_TYPES[key]))
        pq.write_table(table, path)
    lines = [json.dumps(m.jsonl_row()) for m in sorted(metas, key=lambda m: m.episode_index)]
    (root / EPISODES_JSONL).write_text("\n".join(lines) + "\n")

