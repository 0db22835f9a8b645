"""Where a model version came from: the code's git commit, the DVC revision of its training data,
the MLflow run that trained it, and its evaluation metrics."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

TRAINER_STATE = "trainer_state.json"  # written by `vaops train` next to each checkpoint


@dataclass(frozen=True)
class DataRevision:
    path: str  # the dataset path as DVC tracks it
    md5: str  # DVC's content hash of the dataset (".dir" suffix for a directory)
    pointer: str  # the .dvc file or dvc.lock that records it
    git_rev: str | None  # the commit that last changed that record


@dataclass(frozen=True)
class Lineage:
    git_commit: str | None
    git_dirty: bool | None
    data: DataRevision | None
    train_run_id: str | None

    def tags(self) -> dict[str, str]:
        tags = {"vaops.git_commit": self.git_commit or "unknown",
                "vaops.git_dirty": "unknown" if self.git_dirty is None else str(self.git_dirty).lower(),
                "vaops.train_run_id": self.train_run_id or "unknown"}
        if self.data is not None:
            tags.update({"vaops.data_path": self.data.path, "vaops.data_md5": self.data.md5,
                         "vaops.data_pointer": self.data.pointer, "vaops.data_git_rev": self.data.git_rev or "uncommitted"})
        return tags


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(repo: Path) -> tuple[str | None, bool | None]:
    commit = _git(repo, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


def _out_hash(out: dict, source: Path) -> str:
    for key in ("md5", "etag", "checksum"):
        if out.get(key):
            return str(out[key])
    raise ValueError(f"{source}: the output {out.get('path')!r} records no content hash")


def data_revision(data: Path, repo: Path) -> DataRevision:
    """The DVC record of `data`: its `.dvc` file, or the dvc.lock output of the stage that made it."""
    data = Path(data)
    pointer = data if data.suffix == ".dvc" else data.with_name(data.name + ".dvc")
    if pointer.is_file():
        try:
            raw = yaml.safe_load(pointer.read_text())
            out = raw["outs"][0]
        except (yaml.YAMLError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{pointer}: not a DVC pointer file ({e})") from None
        tracked = (pointer.parent / out["path"]).as_posix()
        rev = _git(repo, "log", "-n", "1", "--format=%H", "--", str(pointer.resolve()))
        return DataRevision(tracked, _out_hash(out, pointer), str(pointer), rev or None)
    lock = Path(repo) / "dvc.lock"
    if lock.is_file():
        try:
            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        except yaml.YAMLError as e:
            raise ValueError(f"{lock}: not valid YAML ({e})") from None
        want = data.resolve()
        for stage in stages.values():
            for out in stage.get("outs", []) or []:
                if (Path(repo) / out.get("path", "")).resolve() == want:
                    rev = _git(repo, "log", "-n", "1", "--format=%H", "--", str(lock.resolve()))
                    return DataRevision(out["path"], _out_hash(out, lock), str(lock), rev or None)
    raise ValueError(f"{data}: not tracked by DVC (no {pointer.name} and no output of that path in {lock})")


def train_run_from_checkpoint(checkpoint: Path) -> str | None:
    state = Path(checkpoint) / TRAINER_STATE
    if not state.is_file():
        return None
    try:
        return json.loads(state.read_text()).get("run_id")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{state}: unreadable trainer state ({e})") from None


def read_metrics(path: Path) -> dict[str, float]:
    """The numbers at the top level of an evaluation's metrics.json."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: metrics file does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of metrics, got {type(raw).__name__}")
    return {k: float(v) for k, v in raw.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def read_operating_point(path: Path) -> str:
    """The sampling settings an evaluation ran with (its metrics.json `identity.operating_point`);
    `released` (the model's own) when it names none."""
    raw = json.loads(Path(path).read_text())
    identity = raw.get("identity") if isinstance(raw, dict) else None
    return (identity or {}).get("operating_point") or "released"
