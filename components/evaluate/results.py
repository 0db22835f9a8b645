"""Episode records, work units, shards and their merge.

Work is split into units: one episode of the ALOHA sim, or all trials of one RoboTwin task and
setting (its seeds are found by walking the expert-feasible ones in order, so a task's trials
belong together). Shard `i/n` runs units `i, i+n, i+2n, ...` and appends one JSON line per
finished episode to its own `shards/shard-i-of-n/episodes.jsonl`, so an interrupted shard
resumes where it stopped; an episode that ended in error runs again on resuming, and its new
line supersedes the old one. `merge` checks that all `n` shards of one evaluation finished and
agree on what they evaluated, then concatenates their records.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from vaops.models.atomic import read_json, write_text_atomically
from vaops.models.codec import decode, encode

from .config import EvalConfig, Shard

EPISODES_FILE = "episodes.jsonl"
MANIFEST_FILE = "shard.json"


@dataclass
class EpisodeRecord:
    suite: str
    setting: str
    task: str
    episode: int  # trial index within (setting, task)
    seed: int
    prompt: str
    status: str  # success | failure | error
    success: bool
    progress: float
    steps: int
    chunks: int
    chunk_latency_s: list[float] = field(default_factory=list)
    observe_latency_s: list[float] = field(default_factory=list)
    idle_s: list[float] = field(default_factory=list)  # control loop idle between chunks
    execution_s: list[float] = field(default_factory=list)  # wall time executing each chunk
    error: str | None = None
    wall_s: float = 0.0
    video: str | None = None  # relative to the evaluation's output folder

    @property
    def key(self) -> tuple[str, str, int]:
        return self.setting, self.task, self.episode


@dataclass(frozen=True)
class WorkUnit:
    setting: str
    task: str
    episodes: tuple[int, ...]


def work_units(config: EvalConfig) -> list[WorkUnit]:
    units = []
    for setting in config.settings:
        for task in config.tasks:
            if config.suite == "robotwin":
                units.append(WorkUnit(setting, task, tuple(range(config.episodes))))
            else:
                units.extend(WorkUnit(setting, task, (e,)) for e in range(config.episodes))
    return units


def shard_units(units: list[WorkUnit], shard: Shard) -> list[WorkUnit]:
    return units[shard.index::shard.count]


class EpisodeLog:
    """Append-only JSON lines; a line cut short by a crash is ignored on reading, and of several
    lines of one episode (it ended in error and ran again) the last one counts."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[EpisodeRecord]:
        """The latest record of each episode so far; a trailing partial line (a shard killed
        mid-write) is cut off."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        records: dict[tuple[str, str, int], EpisodeRecord] = {}
        for n, line in enumerate(data.decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{self.path}:{n}: not a JSON line") from None
            record = decode(EpisodeRecord, raw, f"{self.path}:{n}")
            records[record.key] = record
        return list(records.values())

    def append(self, record: EpisodeRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(encode(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: Path, payload) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")


def check_resumable(config: EvalConfig) -> None:
    """A shard folder that already exists must belong to the same evaluation to be resumed."""
    path = config.shard_dir() / MANIFEST_FILE
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())["identity"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: unreadable shard manifest ({e})") from None
    if old != config.identity():
        changed = sorted(k for k in set(old) | set(config.identity()) if old.get(k) != config.identity().get(k))
        raise ValueError(f"{path}: this folder holds another evaluation (different {', '.join(changed)}); "
                         f"use a new --output or the same settings")


def write_manifest(config: EvalConfig, complete: bool, episodes: int) -> None:
    write_json_atomic(config.shard_dir() / MANIFEST_FILE, {
        "identity": config.identity(), "shard": config.shard.index, "complete": complete, "episodes": episodes,
    })


def merge(output_dir: Path) -> tuple[dict, list[EpisodeRecord]]:
    """(identity, records) of all shards of the evaluation in `output_dir`, checked complete."""
    output_dir = Path(output_dir)
    manifests = sorted((output_dir / "shards").glob(f"*/{MANIFEST_FILE}"))
    if not manifests:
        raise FileNotFoundError(f"{output_dir}: no shards to merge (expected shards/*/{MANIFEST_FILE})")
    loaded = []
    for path in manifests:
        loaded.append((path, read_json(path, "shard manifest")))
    identity = loaded[0][1]["identity"]
    for path, m in loaded[1:]:
        if m["identity"] != identity:
            raise ValueError(f"{path}: evaluates something else than {loaded[0][0]} "
                             f"({m['identity']} vs {identity}); shards of different runs cannot be merged")
    count = identity["shard_count"]
    present = {m["shard"]: (path, m) for path, m in loaded}
    missing = sorted(set(range(count)) - set(present))
    if missing:
        raise ValueError(f"{output_dir}: shard(s) {missing} of {count} have not run")
    unfinished = [str(path.parent.name) for path, m in present.values() if not m["complete"]]
    if unfinished:
        raise ValueError(f"{output_dir}: shard(s) {unfinished} did not finish; re-run them (they resume)")
    records = []
    for path, _ in sorted(present.values(), key=lambda pm: pm[1]["shard"]):
        records.extend(EpisodeLog(path.parent / EPISODES_FILE).read())
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{output_dir}: an episode appears in more than one shard")
    return identity, sort_records(records)


def sort_records(records: Iterable[EpisodeRecord]) -> list[EpisodeRecord]:
    return sorted(records, key=lambda r: r.key)
