"""The project's dvc.yaml in a fresh git+DVC repository: the whole chain through `vaops`, reruns of
only what changed, a push/pull round trip through the default local remote, and ingest of a
dataset at a git revision. No network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from data_support import REPO, tree_digest

from vaops.components.dataset import DatasetError, LeRobotData
from vaops.components.ingest.config import IngestConfig
from vaops.components.ingest.stage import run as ingest

OUTPUTS = ("data/demos", "data/clean", "data/augmented", "data/encoded")


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _dvc(*args: str, cwd: Path) -> str:
    return _run([str(Path(sys.executable).parent / "dvc"), *args], cwd)


def test_dvc_pipeline_reruns_only_what_changed_and_round_trips_through_the_remote(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    _dvc("init", "-q", cwd=repo)
    shutil.copyfile(REPO / ".dvc" / "config", repo / ".dvc" / "config")  # the project's default remote
    shutil.copyfile(REPO / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["demos"].update(episodes=1, time_scale=0.5)  # one demo and its augmented copy
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / ".gitignore").write_text("/.dvc-storage\n")

    out = _dvc("repro", cwd=repo)
    for stage in ("demos", "validate", "clean", "augment", "encode"):
        assert f"Running stage '{stage}'" in out
    assert len(LeRobotData(repo / "data/encoded").episodes) == 2
    assert (repo / "data/reports/validate/report.json").is_file()
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "v1"], repo)
    _run(["git", "tag", "v1"], repo)
    assert "up to date" in _dvc("status", cwd=repo)
    _dvc("push", cwd=repo)

    params["augment"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    status = _dvc("status", cwd=repo)
    assert "augment:" in status and "demos:" not in status and "clean:" not in status
    before = {p: tree_digest(repo / p) for p in ("data/demos", "data/clean")}
    out = _dvc("repro", cwd=repo)
    for stage in ("demos", "validate", "clean"):
        assert f"Stage '{stage}' didn't change, skipping" in out
    assert "Running stage 'augment'" in out and "Running stage 'encode'" in out
    assert {p: tree_digest(repo / p) for p in before} == before

    _dvc("push", cwd=repo)
    assert any((repo / ".dvc-storage").rglob("*")), "nothing reached the default remote"
    saved = {p: tree_digest(repo / p) for p in OUTPUTS}
    shutil.rmtree(repo / ".dvc" / "cache")
    for p in OUTPUTS:
        shutil.rmtree(repo / p)
    _dvc("pull", cwd=repo)
    assert {p: tree_digest(repo / p) for p in OUTPUTS} == saved

    # a dataset at an older revision, straight from the repository's DVC store
    _run(["git", "commit", "-qam", "v2"], repo)
    result = ingest(IngestConfig(repo=str(repo), rev="v1", source="data/augmented",
                                 output=str(tmp_path / "v1-augmented")))
    assert result.episodes == 2
    old = LeRobotData(tmp_path / "v1-augmented")
    assert old.episodes[0].augmentation is None and old.episodes[1].augmentation["seed"] == 0
    assert LeRobotData(repo / "data/augmented").episodes[1].augmentation["seed"] == 1
    with pytest.raises(DatasetError, match="no such directory"):
        ingest(IngestConfig(repo=str(repo), rev="v1", source="data/nothing", output=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()
