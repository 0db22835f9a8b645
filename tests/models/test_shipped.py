"""Shipped policies: a checkpoint without the encoders it can rebuild (the transformer, policy.json,
shipped.json, lineage.json) turns back into the same checkpoint, and says in one line when it cannot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vaops.models.checkpoint import (
    ENCODER_WEIGHTS,
    LINEAGE_FILE,
    TRANSFORMER_WEIGHTS,
    load_weights,
    materialize_shipped,
    ship_checkpoint,
    write_random_checkpoint,
    write_tiny_checkpoint,
)
from vaops.models.model_source import SHIPPED_FILE, resolve_checkpoint

LINEAGE = {"commands": ["vaops train --recipe tiny"], "code": {"commit": "abc123"}}


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("full") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def shipped(full, tmp_path_factory) -> Path:
    return ship_checkpoint(full, tmp_path_factory.mktemp("shipped") / "tiny-policy", LINEAGE)


def _states(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    w = load_weights(folder)
    return {"transformer": w.transformer.state_dict(), "vae": w.vae.state_dict(),
            "text_encoder": w.text_encoder.model.state_dict()}


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_a_shipped_policy_materializes_to_the_same_weights(full, shipped, tmp_path):
    assert sorted(p.name for p in shipped.iterdir()) == sorted(["transformer", "policy.json", SHIPPED_FILE, LINEAGE_FILE])
    assert json.loads((shipped / LINEAGE_FILE).read_text()) == LINEAGE
    back = materialize_shipped(shipped, tmp_path / "back")
    before, after = _states(full), _states(back)
    for part in before:
        assert before[part].keys() == after[part].keys(), part
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part]), part
    stats = ("latents_mean", "latents_std")
    vae_before, vae_after = (json.loads((f / "vae" / "config.json").read_text()) for f in (full, back))
    assert [vae_before[k] for k in stats] == [vae_after[k] for k in stats]
    assert (back / "policy.json").read_bytes() == (full / "policy.json").read_bytes()


def test_a_changed_hash_stops_with_one_line(shipped, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("policy.json", LINEAGE_FILE):
        (bad / name).write_bytes((shipped / name).read_bytes())
    (bad / "transformer").symlink_to(shipped / "transformer")
    record = json.loads((shipped / SHIPPED_FILE).read_text())
    record["sha256"][ENCODER_WEIGHTS[0]] = "0" * 64
    (bad / SHIPPED_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError) as e:
        materialize_shipped(bad, tmp_path / "out")
    assert _one_line(e) == (f"{bad}: the rebuilt {ENCODER_WEIGHTS[0]} differ from the sha256 in {SHIPPED_FILE}: "
                            f"this code's 'tiny' preset no longer builds the encoders the policy was trained with "
                            f"(seed 0)")
    assert not (tmp_path / "out").exists()

    record = json.loads((shipped / SHIPPED_FILE).read_text())
    record["sha256"][TRANSFORMER_WEIGHTS] = "0" * 64  # as a Git LFS pointer file would read
    (bad / SHIPPED_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="not the shipped transformer") as e:
        materialize_shipped(bad, tmp_path / "out")
    _one_line(e)


def test_encoders_that_do_not_rebuild_are_not_shipped(tmp_path):
    other = write_random_checkpoint(tmp_path / "other", "tiny", seed=3)  # the tiny preset's seed is 0
    with pytest.raises(ValueError, match="are not the 'tiny' preset's random weights at seed 0") as e:
        ship_checkpoint(other, tmp_path / "shipped", LINEAGE)
    _one_line(e)
    assert not (tmp_path / "shipped").exists()
    ship_checkpoint(other, tmp_path / "shipped", LINEAGE, seed=3)  # the seed it was built with


def test_resolve_materializes_once_into_the_model_cache(shipped, monkeypatch, tmp_path):
    monkeypatch.setenv("VAOPS_MODEL_CACHE", str(tmp_path / "cache"))
    folder = resolve_checkpoint(str(shipped))
    assert folder.is_relative_to(tmp_path / "cache") and (folder / "vae").is_dir()
    stamp = (folder / "vae" / "config.json").stat().st_mtime_ns
    assert resolve_checkpoint(str(shipped)) == folder  # reused, not rebuilt
    assert (folder / "vae" / "config.json").stat().st_mtime_ns == stamp
    assert os.path.samefile(folder / TRANSFORMER_WEIGHTS, shipped / TRANSFORMER_WEIGHTS)  # linked, not copied
