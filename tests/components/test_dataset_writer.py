"""The sharded writer (`write_dataset(workers=N)`) writes the dataset one process would: same
episodes in the same order, same frames, metadata and statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vaops.components import dataset as dataset_module
from vaops.components.dataset import DatasetError, LeRobotData, write_dataset


def _write(src: LeRobotData, dst, workers: int, episodes=None):
    indices = range(len(src.episodes)) if episodes is None else episodes
    return LeRobotData(write_dataset(dst, (src.episode(i) for i in indices), fps=src.fps,
                                     features=src.user_features(), robot_type=src.robot_type, vcodec="h264",
                                     total=len(indices), workers=workers))


def test_sharded_write_matches_one_writer(demos_source, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "SHARD_EPISODES", 2)  # 6 episodes: 3 shards, 2 processes
    src = LeRobotData(demos_source)
    one = _write(src, tmp_path / "one", workers=1)
    many = _write(src, tmp_path / "many", workers=2)

    assert len(many.episodes) == len(one.episodes) == len(src.episodes)
    assert many.info["total_frames"] == one.info["total_frames"]
    assert many.task_names() == one.task_names()
    for i in range(len(src.episodes)):
        assert many.episode_meta(i) == one.episode_meta(i)
        a, b = one.episode(i), many.episode(i)
        for key in a.arrays:
            np.testing.assert_array_equal(b.arrays[key], a.arrays[key])
        # untouched videos are the source's bytes in both
        for key in src.video_keys:
            assert many.video_file(i, key).read_bytes() == src.video_file(i, key).read_bytes()
        assert b.frame_tasks == a.frame_tasks
        assert list(many.frames(i)["index"]) == list(one.frames(i)["index"])
    stats_one = json.loads((one.root / "meta" / "stats.json").read_text())
    stats_many = json.loads((many.root / "meta" / "stats.json").read_text())
    for key in ("action", "observation.state"):
        for stat in ("min", "max", "mean"):
            np.testing.assert_allclose(stats_many[key][stat], stats_one[key][stat], rtol=1e-5, atol=1e-6)
    assert not (many.root / "images").exists()
    assert [p.name for p in tmp_path.iterdir()] and all(not p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_failing_source_leaves_nothing_written(demos_source, tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "SHARD_EPISODES", 2)
    src = LeRobotData(demos_source)
    before = _write(src, tmp_path / "out", workers=1, episodes=[0])

    def episodes():
        for i in range(4):
            yield src.episode(i)
        raise DatasetError("episode 4: unreadable")

    with pytest.raises(DatasetError, match="episode 4"):
        write_dataset(tmp_path / "out", episodes(), fps=src.fps, features=src.user_features(),
                      robot_type=src.robot_type, vcodec="h264", workers=2)
    assert len(LeRobotData(tmp_path / "out").episodes) == len(before.episodes) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_metadata_readers_agree_with_lerobots(demos_source):
    """components.dataset reads info.json and tasks.parquet itself (importing lerobot's helpers costs a
    stage process 6-11 s); what it reads must be what lerobot's own readers return."""
    import pandas as pd
    from lerobot.datasets import utils as lerobot_utils

    from vaops.components import dataset

    root = LeRobotData(demos_source).root
    assert dataset.load_info(root) == lerobot_utils.load_info(root)
    pd.testing.assert_frame_equal(dataset.load_tasks(root), lerobot_utils.load_tasks(root))
    assert set(dataset.DEFAULT_FEATURES) == set(lerobot_utils.DEFAULT_FEATURES)
