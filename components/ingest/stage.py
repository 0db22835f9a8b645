"""Bring any LeRobot dataset into the form the data stages read, never touching the source.

- v3.0 (lerobot >= 0.4): copied (lerobot's empty `images/` staging folder left out);
- v2.1 (the released LingBot-VA post-training data, lerobot <= 0.3): converted with lerobot's
  own converter (`lerobot.datasets.v30.convert_dataset_v21_to_v30`), whose steps read the
  source and write only into the output;
- a path inside a git+DVC repository at a revision: fetched with `dvc.api.DVCFileSystem`
  from the repository's cache or its configured remote, then as above.

In every case the episode metadata is normalised: `action_config` (from the episodes parquet
or the legacy `meta/episodes.jsonl`) becomes a typed column, and `meta/episodes.jsonl` mirrors it.

v2.1 sources are checked before lerobot's converter sees them: every episode of
`meta/episodes.jsonl` needs its parquet, its stats row and one mp4 per camera (else one error
line names what is missing). Two variants the converter cannot take are staged in a temporary
folder first (the source stays untouched): rows without `action_config` get an empty list, and
episode indices with gaps are renumbered 0..N-1 in order (parquet `episode_index` and `index`
rewritten, videos linked). Anything the converter still refuses ends in one error line.

What was written is then verified: every data parquet readable, every referenced video present
and decodable at its episode's first and last frame. Broken files are listed in the result (the
command exits 1); validate quarantines those episodes and clean drops them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq

from vaops.components.dataset import (
    CODEBASE_VERSION,
    PER_EPISODE_FILE_MB,
    DatasetError,
    LeRobotData,
    decode_frames,
    skip_empty_images,
    write_episode_metadata,
)
from vaops.models.atomic import write_folder_atomically

from .config import IngestConfig

LEGACY_VERSION = "v2.1"


@dataclass
class IngestResult:
    output: Path
    source_version: str
    episodes: int
    frames: int
    broken: list[str] = field(default_factory=list)  # one line per broken file: path, episode, why
    notes: list[str] = field(default_factory=list)  # what conversion filled in or renumbered


def _version(root: Path) -> str:
    from lerobot.datasets.utils import load_info

    info = root / "meta" / "info.json"
    if not info.is_file():
        raise DatasetError(f"{info}: missing (not a LeRobot dataset directory)")
    try:
        return str(load_info(root).get("codebase_version"))
    except ValueError as e:
        raise DatasetError(f"{info}: unreadable ({e})") from None


def _short(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit] + "..."


def _span(indices: list[int]) -> str:
    return ", ".join(map(str, indices[:5])) + (f" and {len(indices) - 5} more" if len(indices) > 5 else "")


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing; a v2.1 dataset needs it for conversion")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{n}: a row must be a JSON object")
        rows.append(row)
    return rows


def _indexed(path: Path, rows: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for n, row in enumerate(rows, 1):
        try:
            index = int(row["episode_index"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{path}: row {n} has no integer episode_index") from None
        if index in out:
            raise DatasetError(f"{path}: episode_index {index} appears twice")
        out[index] = row
    return out


def _episode_files(folder: Path, pattern: str, suffix: str) -> dict[int, Path]:
    out = {}
    for path in sorted(folder.glob(pattern)):
        m = re.fullmatch(rf"episode_(\d+){re.escape(suffix)}", path.name)
        if m:
            out[int(m.group(1))] = path
    return out


@dataclass
class _Legacy:
    episodes: dict[int, dict]
    stats: dict[int, dict]
    data: dict[int, Path]
    videos: dict[str, dict[int, Path]]


def _check_v21(src: Path) -> _Legacy:
    """The v2.1 source's episode rows, stats rows, parquet and mp4 files, agreeing on the episodes."""
    from lerobot.datasets.utils import load_info

    meta = src / "meta"
    _jsonl(meta / "tasks.jsonl")
    episodes = _indexed(meta / "episodes.jsonl", _jsonl(meta / "episodes.jsonl"))
    stats = _indexed(meta / "episodes_stats.jsonl", _jsonl(meta / "episodes_stats.jsonl"))
    if not episodes:
        raise DatasetError(f"{meta / 'episodes.jsonl'}: no episodes")
    for index, row in episodes.items():
        for key in ("length", "tasks"):
            if key not in row:
                raise DatasetError(f"{meta / 'episodes.jsonl'}: episode {index} has no {key!r}")
    cameras = [k for k, ft in load_info(src)["features"].items() if ft["dtype"] == "video"]
    files = {"data parquet": _episode_files(src / "data", "*/episode_*.parquet", ".parquet")}
    files.update({f"{k} mp4": _episode_files(src / "videos", f"*/{k}/episode_*.mp4", ".mp4") for k in cameras})
    for what, found in files.items():
        missing = sorted(set(episodes) - set(found))
        if missing:
            raise DatasetError(f"{meta / 'episodes.jsonl'}: episodes {_span(missing)} have no {what} "
                               f"(looked for episode_{missing[0]:06d}.* under {src})")
        extra = sorted(set(found) - set(episodes))
        if extra:
            raise DatasetError(f"{found[extra[0]]}: episode {extra[0]} has no row in {meta / 'episodes.jsonl'}"
                               + (f" ({len(extra) - 1} more such files)" if len(extra) > 1 else ""))
    missing = sorted(set(episodes) - set(stats))
    if missing:
        raise DatasetError(f"{meta / 'episodes_stats.jsonl'}: no stats for episodes {_span(missing)}")
    data = files.pop("data parquet")
    return _Legacy(episodes, stats, data, {k: files[f"{k} mp4"] for k in cameras})


def _stage_v21(src: Path, legacy: _Legacy, stage: Path) -> tuple[Path, list[str]]:
    """A folder lerobot's converter takes: `src` itself, or a staged copy with defaults filled in
    and episodes renumbered 0..N-1 (data rewritten, videos linked)."""
    order = sorted(legacy.episodes)
    gap = order != list(range(len(order)))
    partial = [i for i in order if "action_config" not in legacy.episodes[i]]
    if not gap and not partial:
        return src, []
    notes = []
    if partial:
        notes.append(f"episodes {_span(partial)} ({len(partial)} of {len(order)}) had no action_config: "
                     f"given an empty one")
    new = {old: i for i, old in enumerate(order)}
    (stage / "meta").mkdir(parents=True)
    info = json.loads((src / "meta" / "info.json").read_text())
    info["total_episodes"] = len(order)
    (stage / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    shutil.copyfile(src / "meta" / "tasks.jsonl", stage / "meta" / "tasks.jsonl")
    (stage / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"action_config": [], **legacy.episodes[old], "episode_index": new[old]}) + "\n"
        for old in order))
    (stage / "meta" / "episodes_stats.jsonl").write_text("".join(
        json.dumps({**legacy.stats[old], "episode_index": new[old]}) + "\n" for old in order))
    if not gap:
        for folder in ("data", "videos"):
            if (src / folder).is_dir():
                os.symlink((src / folder).resolve(), stage / folder)
        return stage, notes
    moved = [o for o in order if new[o] != o]
    notes.append(f"episode indices {_span(moved)} renumbered to {_span([new[o] for o in moved])} "
                 f"(the source's indices have gaps)")
    frame = 0
    for old in order:
        path = legacy.data[old]
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise DatasetError(f"{path}: unreadable data parquet of episode {old} ({_short(str(e), 160)})") from None
        n = table.num_rows
        for name, values in (("episode_index", [new[old]] * n), ("index", list(range(frame, frame + n)))):
            if name in table.column_names:
                i = table.column_names.index(name)
                table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
        frame += n
        out = stage / "data" / "chunk-000" / f"episode_{new[old]:06d}.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
        for key, videos in legacy.videos.items():
            link = stage / "videos" / "chunk-000" / key / f"episode_{new[old]:06d}.mp4"
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(videos[old].resolve(), link)
    return stage, notes


def _root_cause(e: BaseException) -> str:
    while (inner := e.__cause__ or (None if e.__suppress_context__ else e.__context__)) is not None:
        e = inner
    return f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def _one_bar(converter, desc: str, total: int):
    """One bar for the whole conversion instead of the converter's own (data files, videos, then one
    per camera: four or more bars for one dataset): its tqdm is silenced while it runs."""
    import tqdm

    quiet = types.SimpleNamespace(tqdm=functools.partial(tqdm.tqdm, disable=True))
    with mock.patch.object(converter, "tqdm", quiet), tqdm.tqdm(total=total, desc=desc, unit="phase") as bar:
        yield bar


def _convert_v21(src: Path, dst: Path) -> list[str]:
    from lerobot.datasets.utils import DEFAULT_DATA_FILE_SIZE_IN_MB
    from lerobot.datasets.v30 import convert_dataset_v21_to_v30 as conv

    legacy = _check_v21(src)
    with tempfile.TemporaryDirectory(prefix=".stage-", dir=dst.parent) as staged:
        root, notes = _stage_v21(src, legacy, Path(staged) / "dataset")
        # convert_dataset() without its hub download and its in-place renames of the source. Videos
        # stay one file per episode; the parquet files keep lerobot's default size, because
        # convert_data() records the wrong file index for an episode that starts a new file.
        try:
            with _one_bar(conv, "convert v2.1 -> v3.0", total=5) as bar:
                conv.convert_info(root, dst, DEFAULT_DATA_FILE_SIZE_IN_MB, PER_EPISODE_FILE_MB)
                conv.convert_tasks(root, dst)
                bar.update(2)
                episodes = conv.convert_data(root, dst, DEFAULT_DATA_FILE_SIZE_IN_MB)
                bar.update()
                videos = conv.convert_videos(root, dst, PER_EPISODE_FILE_MB)
                bar.update()
                conv.convert_episodes_metadata(root, dst, episodes, videos)
                bar.update()
        except Exception as e:  # the converter raises datasets', pyarrow's, PyAV's and its own errors
            raise DatasetError(f"{src}: lerobot's v2.1 -> v3.0 converter failed ({_short(_root_cause(e))})") from None
    return notes


def verify(root: Path) -> list[str]:
    """One line per broken file of a v3.0 dataset: a data parquet missing or unreadable, a video
    missing or not decodable at an episode's first or last frame."""
    data = LeRobotData(root)
    broken: list[str] = []
    checked: set[Path] = set()
    for meta in data.episodes:
        ep = meta.episode_index
        path = data.data_file(ep)
        if path not in checked:
            checked.add(path)
            if not path.is_file():
                broken.append(f"{path}: data parquet is missing (episode {ep} and any others it holds)")
            else:
                try:
                    pq.read_table(path)
                except (OSError, pa.ArrowInvalid) as e:
                    broken.append(f"{path}: data parquet is unreadable ({_short(str(e), 160)}; episode {ep} and "
                                  f"any others it holds)")
        for key in data.video_keys:
            try:
                video = data.video_file(ep, key)
            except DatasetError as e:
                broken.append(str(e))
                continue
            if not video.is_file():
                broken.append(f"{video}: video of camera {key!r} is missing (episode {ep})")
                continue
            start = data.video_offset(ep, key)
            last = start + (meta.length - 1) / data.fps
            try:
                decode_frames(video, [start + 1e-4, last + 1e-4])
            except Exception as e:  # torchcodec and PyAV raise RuntimeError/ValueError/av.error variants
                reason = re.sub(r"(SingleStreamDecoder, )?\S+\.cpp:\d+,\s*", "", str(e))
                broken.append(f"{video}: camera {key!r}, episode {ep}: cannot decode its frames at "
                              f"{start:.2f}-{last:.2f} s ({_short(reason, 160)})")
    return broken


def _normalise(src: Path, dst: Path) -> tuple[str, list[str]]:
    version = _version(src)
    notes: list[str] = []
    if version == LEGACY_VERSION:
        notes = _convert_v21(src, dst)
    elif version == CODEBASE_VERSION:
        shutil.copytree(src, dst, dirs_exist_ok=True, ignore=skip_empty_images(src))
    else:
        raise DatasetError(f"{src / 'meta' / 'info.json'}: codebase_version {version!r} is not supported "
                           f"(expected {LEGACY_VERSION} or {CODEBASE_VERSION})")
    write_episode_metadata(dst, LeRobotData(dst).episodes)
    return version, notes


def _fetch(cfg: IngestConfig, into: Path) -> Path:
    from dvc.api import DVCFileSystem

    where = f"{cfg.repo}@{cfg.rev or 'workspace'}:{cfg.source}"
    try:
        fs = DVCFileSystem(cfg.repo, rev=cfg.rev)
        found = fs.isdir(cfg.source)
        if found:
            fs.get(cfg.source, str(into), recursive=True)
    except Exception as e:  # dvc, scmrepo and dvc-data raise unrelated types for a bad repo/rev/cache
        raise DatasetError(f"{where}: cannot fetch ({type(e).__name__}: {e}); is it pushed to the "
                           f"repository's DVC remote?") from None
    if not found:
        raise DatasetError(f"{where}: no such directory in the repository")
    return into




def run(cfg: IngestConfig) -> IngestResult:
    if not cfg.source:
        raise ValueError("source is required (a dataset directory, or a path inside --repo)")
    output = Path(cfg.output)
    version = ""
    notes: list[str] = []
    broken: list[str] = []

    def build(tmp: Path) -> None:
        nonlocal version, notes, broken
        if cfg.repo is None:
            src = Path(cfg.source)
            if src.resolve() == output.resolve():
                raise ValueError(f"output {output} is the source itself; ingest never modifies its source")
            version, notes = _normalise(src, tmp)
        else:
            with tempfile.TemporaryDirectory(prefix=".fetch-", dir=output.parent) as fetched:
                version, notes = _normalise(_fetch(cfg, Path(fetched) / "dataset"), tmp)
        broken = [line.replace(str(tmp), str(output)) for line in verify(tmp)]

    output.parent.mkdir(parents=True, exist_ok=True)
    write_folder_atomically(output, build)
    data = LeRobotData(output)
    return IngestResult(output, version, len(data.episodes), sum(m.length for m in data.episodes), broken, notes)
