"""Where a served checkpoint comes from, and what is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vaops.models.model_source import parse_model_uri, resolve_checkpoint, tracking_uri


def test_checkpoint_folders_with_pickles_are_refused(tiny_checkpoint, tmp_path):
    assert resolve_checkpoint(str(tiny_checkpoint)) == Path(tiny_checkpoint)
    pickled = shutil.copytree(tiny_checkpoint, tmp_path / "pickled")
    (pickled / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"pickled weights \['vae/diffusion_pytorch_model.bin'\] are refused"):
        resolve_checkpoint(str(pickled))
    with pytest.raises(FileNotFoundError, match="policy.json is missing"):
        resolve_checkpoint(str(tmp_path))


def test_model_uris(monkeypatch, tmp_path):
    assert parse_model_uri("models:/va@champion") == ("va", "champion", None)
    assert parse_model_uri("models:/va/3") == ("va", None, "3")
    with pytest.raises(ValueError, match="must be models:/<name>@<alias>"):
        parse_model_uri("models:/va")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_uri() == "http://mlflow:5000"
    with pytest.raises(FileNotFoundError, match="models:/nothing@champion: not in the model registry"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
        resolve_checkpoint("models:/nothing@champion")


def test_artifact_root_of_a_relative_sqlite_store_is_beside_it(tmp_path, monkeypatch):
    from vaops.models.model_source import artifact_root

    monkeypatch.chdir(tmp_path)
    assert artifact_root("sqlite:///runs/mlflow.db") == (tmp_path / "runs" / "mlartifacts").as_uri()
    assert artifact_root("sqlite:////abs/mlflow.db") == "file:///abs/mlartifacts"
    assert artifact_root("http://mlflow:5000") is None
