"""ingest: v2.1 (the released layout) through lerobot's converter, v3.0 copied; the source untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_support import CAMERA, DEMO_EPISODES, copy_dataset, export_v21, tree_digest, vaops

from vaops.components.dataset import DatasetError, LeRobotData
from vaops.components.ingest.config import IngestConfig
from vaops.components.ingest.stage import run as ingest


def test_ingest_v21_converts_with_lerobot_and_keeps_segments(demos_source, tmp_path, capsys):
    v21 = export_v21(demos_source, tmp_path / "released")
    before = tree_digest(v21)
    result = ingest(IngestConfig(source=str(v21), output=str(tmp_path / "out")))
    bars = capsys.readouterr().err
    # one bar for the conversion, not the converter's own per phase and per camera
    assert "convert v2.1 -> v3.0" in bars and "5/5" in bars
    assert "convert data files" not in bars and "convert videos" not in bars
    assert tree_digest(v21) == before, "ingest modified its source"
    assert result.source_version == "v2.1" and result.episodes == DEMO_EPISODES

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("local/out", root=tmp_path / "out")  # lerobot itself reads the result
    assert ds.num_episodes == DEMO_EPISODES and tuple(ds[0][CAMERA].shape) == (3, 64, 96)
    src, out = LeRobotData(demos_source), LeRobotData(tmp_path / "out")
    for a, b in zip(src.episodes, out.episodes):
        assert (a.episode_index, a.length, a.tasks, a.action_config) == (b.episode_index, b.length, b.tasks,
                                                                           b.action_config)
        np.testing.assert_array_equal(src.arrays(a.episode_index)["action"], out.arrays(b.episode_index)["action"])
    np.testing.assert_array_equal(src.video(3, CAMERA), out.video(3, CAMERA))
    rows = [json.loads(line) for line in (tmp_path / "out" / "meta" / "episodes.jsonl").read_text().splitlines()]
    assert rows[0]["action_config"][0]["action_text"] == src.episodes[0].action_config[0].action_text


def test_ingest_v30_copies_and_rejects_bad_sources(demos_source, tmp_path):
    src = copy_dataset(demos_source, tmp_path / "src")
    before = tree_digest(src)
    proc = vaops("ingest", "--source", str(src), "--output", str(tmp_path / "out"))
    assert "source was LeRobot v3.0" in proc.stdout and tree_digest(src) == before
    assert len(LeRobotData(tmp_path / "out").episodes) == DEMO_EPISODES

    info = json.loads((src / "meta" / "info.json").read_text())
    (src / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v1.6"}))
    with pytest.raises(DatasetError, match="codebase_version 'v1.6' is not supported"):
        ingest(IngestConfig(source=str(src), output=str(tmp_path / "out")))
    assert len(LeRobotData(tmp_path / "out").episodes) == DEMO_EPISODES, "a failed ingest replaced the output"
    proc = vaops("ingest", "--source", str(tmp_path / "nothing"), "--output", str(tmp_path / "o2"), check=False)
    assert proc.returncode == 2 and "not a LeRobot dataset directory" in proc.stderr
    assert not (tmp_path / "o2").exists()
