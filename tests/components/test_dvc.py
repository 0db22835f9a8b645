"""The project's dvc.yaml in a fresh git+DVC repository: the whole chain through `vaops`, reruns of
only what changed, a push/pull round trip through the default local remote, and ingest of a
dataset at a git revision. No network.

One repository goes through these in order (fixtures v1, then v2); the tests check what each step
left. Its stages are `vaops` processes: about 100 s on 2 cores."""

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


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """A fresh git+DVC repository with the project's dvc.yaml, params (one demo and its augmented
    copy) and default remote: `dvc repro` of the whole chain, committed and tagged v1, pushed."""
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    _dvc("init", "-q", cwd=repo)
    shutil.copyfile(REPO / ".dvc" / "config", repo / ".dvc" / "config")  # the project's default remote
    shutil.copyfile(REPO / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["demos"].update({"episodes": 1, "time-scale": 0.5})
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / ".gitignore").write_text("/.dvc-storage\n")
    repro = _dvc("repro", cwd=repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "v1"], repo)
    _run(["git", "tag", "v1"], repo)
    status = _dvc("status", cwd=repo)
    _dvc("push", cwd=repo)
    return {"repo": repo, "params": params, "repro": repro, "status": status}


@pytest.fixture(scope="module")
def v2(v1):
    """v1 with augment's seed changed: `dvc status` and `dvc repro` (digests of the outputs upstream
    of augment before and after), a push, then the DVC cache and every output deleted and pulled
    back (digests before and after); committed as v2."""
    repo, params = v1["repo"], v1["params"]
    params = {**params, "augment": {**params["augment"], "seed": 1}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    status = _dvc("status", cwd=repo)
    upstream = {p: tree_digest(repo / p) for p in ("data/demos", "data/clean")}
    repro = _dvc("repro", cwd=repo)
    upstream_after = {p: tree_digest(repo / p) for p in upstream}
    _dvc("push", cwd=repo)
    pushed = sorted(p for p in (repo / ".dvc-storage").rglob("*") if p.is_file())
    saved = {p: tree_digest(repo / p) for p in OUTPUTS}
    shutil.rmtree(repo / ".dvc" / "cache")
    for p in OUTPUTS:
        shutil.rmtree(repo / p)
    _dvc("pull", cwd=repo)
    pulled = {p: tree_digest(repo / p) for p in OUTPUTS}
    _run(["git", "commit", "-qam", "v2"], repo)
    return {"repo": repo, "status": status, "repro": repro, "upstream": (upstream, upstream_after), "pushed": pushed,
            "round_trip": (saved, pulled)}


def test_the_chain_runs_every_stage_through_vaops(v1):
    for stage in ("demos", "validate", "clean", "augment", "encode"):
        assert f"Running stage '{stage}'" in v1["repro"]
    assert len(LeRobotData(v1["repo"] / "data/encoded").episodes) == 2  # the demo and its augmented copy
    assert (v1["repo"] / "data/reports/validate/report.json").is_file()
    assert "up to date" in v1["status"]


def test_a_changed_parameter_reruns_only_its_stage_and_those_after(v2):
    assert "augment:" in v2["status"] and "demos:" not in v2["status"] and "clean:" not in v2["status"]
    for stage in ("demos", "validate", "clean"):
        assert f"Stage '{stage}' didn't change, skipping" in v2["repro"]
    assert "Running stage 'augment'" in v2["repro"] and "Running stage 'encode'" in v2["repro"]
    before, after = v2["upstream"]
    assert after == before


def test_the_outputs_round_trip_through_the_default_remote(v2):
    assert v2["pushed"], "nothing reached the default remote"
    saved, pulled = v2["round_trip"]
    assert pulled == saved


def test_ingest_takes_a_dataset_at_an_older_revision(v2, tmp_path):
    """Straight from the repository's DVC store: v1's data is only in the remote now."""
    repo = v2["repo"]
    result = ingest(IngestConfig(repo=str(repo), rev="v1", source="data/augmented",
                                 output=str(tmp_path / "v1-augmented")))
    assert result.episodes == 2
    old = LeRobotData(tmp_path / "v1-augmented")
    assert old.episodes[0].augmentation is None and old.episodes[1].augmentation["seed"] == 0
    assert LeRobotData(repo / "data/augmented").episodes[1].augmentation["seed"] == 1
    with pytest.raises(DatasetError, match="no such directory"):
        ingest(IngestConfig(repo=str(repo), rev="v1", source="data/nothing", output=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()
