"""The defects data teams meet, on a RoboTwin-shaped dataset written by lerobot's own writer with its
default shared files (every episode in one parquet and one mp4 per camera): each is caught with a
reason naming the episode, field or camera and frames; clean drops exactly those and alters no
other episode; v2.1 variants convert or end in one line; ingest verifies what it copies."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_support import (
    ROBOTWIN_CAMERAS,
    ROBOTWIN_FPS,
    copy_dataset,
    export_v21,
    robotwin_episode,
    shift_timestamps,
    tree_digest,
    vaops,
    write_lerobot_default,
)

from vaops.components.augment import transforms
from vaops.components.augment.config import AugmentConfig
from vaops.components.augment.stage import run as augment
from vaops.components.clean.config import CleanConfig
from vaops.components.clean.stage import run as clean
from vaops.components.dataset import DatasetError, LeRobotData
from vaops.components.ingest.config import IngestConfig
from vaops.components.ingest.stage import run as ingest

HIGH, LEFT, _ = ROBOTWIN_CAMERAS
# episode -> (check, field or camera, first and last frame)
PLANTED = {
    1: ("jump", "observation.state[3]", [9, 9]),
    2: ("frozen", LEFT, [0, 19]),
    3: ("blank", HIGH, [5, 9]),
    4: ("task", "task", [0, 19]),
    5: ("limits", "action[13]", [0, 19]),
    6: ("timestamps", "timestamp", [9, 10]),
}
CLEAN = [0, 7]


def cli(stage: str, *args: str) -> int:
    """`vaops <stage> args` in this process (the real parser and main; capfd sees file descriptor 2)."""
    module = importlib.import_module(f"vaops.components.{stage}.cli")
    parser = argparse.ArgumentParser(prog=f"vaops {stage}")
    module.add_arguments(parser)
    return module.main(parser.parse_args(list(args)))


@pytest.fixture(scope="module")
def defects(tmp_path_factory):
    """8 episodes of 20 frames; 0 and 7 clean, the others one planted defect each (PLANTED)."""
    episodes = [robotwin_episode(seed) for seed in range(8)]
    episodes[1]["observation.state"][9, 3] += 0.8                   # one reading off for one frame
    episodes[2]["videos"][LEFT][:] = episodes[2]["videos"][LEFT][0]  # the wrist camera hangs
    episodes[3]["videos"][HIGH][5:10] = 0                            # five black frames
    episodes[4]["tasks"] = [""] * 20                                 # no instruction
    episodes[5]["action"][:, 13] *= 100                              # gripper in the wrong units
    root = write_lerobot_default(tmp_path_factory.mktemp("robotwin") / "raw", episodes)
    shift_timestamps(root, 6, 10, 2 / ROBOTWIN_FPS)                  # two frames lost after frame 9
    return root, episodes


def test_every_defect_is_quarantined_with_field_and_frames_then_dropped_and_nothing_else(defects, tmp_path, capfd):
    root, episodes = defects
    data = LeRobotData(root)
    assert len({data.data_file(i) for i in range(8)}) == 1 and len({data.video_file(i, HIGH) for i in range(8)}) == 1

    assert cli("validate", "--preset", "robotwin", "--dataset", str(root), "--report-dir", str(tmp_path / "val"),
               "--min-usable-fraction", "0.25") == 0
    stdout = capfd.readouterr().out
    report = json.loads((tmp_path / "val" / "report.json").read_text())
    assert report["usable"] and report["robot"] == "robotwin" and report["passed"] == len(CLEAN)
    found = {q["episode_index"]: q["problems"] for q in report["quarantine"]}
    assert set(found) == set(PLANTED)
    for ep, (check, where, frames) in PLANTED.items():
        assert [(p["check"], p["field"], p["frames"]) for p in found[ep]] == [(check, where, frames)], ep
        assert f"episode {ep}: [{where} frames {frames[0]}-{frames[1]}]" in stdout  # the console names it
    assert "+0.764" in found[1][0]["message"] or "+0.76" in found[1][0]["message"]
    assert "skip after frame 9" in found[6][0]["message"] and "2.0 frame periods" in found[6][0]["message"]
    assert "89.9" in found[5][0]["message"] and "[0.000, 1.000]" in found[5][0]["message"]
    # thumbnail strips of the affected cameras: six 32x40 frames side by side, linked from the report
    from PIL import Image

    # (the camera's own for a camera problem, the first camera's around the frames of the others)
    for ep, cam in ((1, HIGH), (2, LEFT), (3, HIGH), (6, HIGH)):
        name = found[ep][0]["thumbnails"]
        assert cam in name and f"]({name})" in (tmp_path / "val" / "report.md").read_text()
        assert Image.open(tmp_path / "val" / name).size[1] == 32
    assert Image.open(tmp_path / "val" / found[2][0]["thumbnails"]).size == (6 * 40 + 5 * 2, 32)
    assert Image.open(tmp_path / "val" / found[1][0]["thumbnails"]).size == (3 * 40 + 2 * 2, 32)  # frames 8-10

    assert cli("clean", "--dataset", str(root), "--output", str(tmp_path / "clean"), "--report-dir",
               str(tmp_path / "cr"), "--validation-report", str(tmp_path / "val")) == 0
    stderr = capfd.readouterr().err
    assert "Svt[" not in stderr and "[mp4 @" not in stderr and "write cleaned" in stderr  # bar yes, encoder no
    assert "Svt[info]" in (tmp_path / "cr" / "encoder.log").read_text()
    crep = json.loads((tmp_path / "cr" / "report.json").read_text())
    assert {d["episode_index"] for d in crep["dropped"]} == set(PLANTED) and crep["changed"] == []
    reasons = {d["episode_index"]: d["reasons"][0] for d in crep["dropped"]}
    assert f"[{LEFT} frames 0-19]" in reasons[2] and "[observation.state[3] frames 9-9]" in reasons[1]
    assert not (tmp_path / "clean" / "images").exists()
    out = LeRobotData(tmp_path / "clean")
    for new, old in enumerate(CLEAN):  # the clean episodes: same numbers, same frames (to video coding loss)
        for key in ("action", "observation.state"):
            np.testing.assert_array_equal(out.arrays(new)[key], episodes[old][key])
        for cam in ROBOTWIN_CAMERAS:
            diff = np.abs(out.video(new, cam).astype(np.float32) - episodes[old]["videos"][cam])
            assert diff.mean() < 6.0, (old, cam, diff.mean())

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("local/clean", root=tmp_path / "clean")
    assert ds.num_episodes == 2 and tuple(ds[25][HIGH].shape) == (3, 32, 40)


def test_clean_maps_state_and_action_grippers_alike(defects, tmp_path):
    root, _ = defects
    result = clean(CleanConfig(dataset=str(root), output=str(tmp_path / "c"), report_dir=str(tmp_path / "r"),
                               gripper_channels=(6, 13), clip_outliers=False, trim_idle=False))
    # without a validation report the same checks run here, with the limits of robot_type aloha-agilex
    assert set(result.dropped) == set(PLANTED)
    out = LeRobotData(tmp_path / "c")
    for key in ("action", "observation.state"):
        grip = np.concatenate([out.arrays(i)[key][:, [6, 13]] for i in range(len(CLEAN))])
        assert grip.min() == pytest.approx(0.0, abs=1e-6) and grip.max() == pytest.approx(1.0, abs=1e-6), key
    assert sum("observation.state gripper channels [6, 13]" in c for cs in result.changed.values() for c in cs) == 2


def test_augment_refuses_empty_task_text(defects, tmp_path):
    root, _ = defects
    with pytest.raises(DatasetError, match=r"episode 4 has no task text in 20 frames \(first: frame 0\)"):
        augment(AugmentConfig(dataset=str(root), output=str(tmp_path / "a"), report_dir=str(tmp_path / "r")))
    assert not (tmp_path / "a").exists()
    assert transforms.paraphrase("", np.random.default_rng(0)) == ""


def test_ingest_verifies_the_v30_copy_and_names_broken_files(defects, tmp_path, capfd):
    root, _ = defects
    src = copy_dataset(root, tmp_path / "src")
    data = LeRobotData(src)
    data.video_file(0, LEFT).unlink()
    parquet = data.data_file(0)
    parquet.write_bytes(parquet.read_bytes()[:200])
    assert cli("ingest", "--source", str(src), "--output", str(tmp_path / "out")) == 1
    broken = [line.strip() for line in capfd.readouterr().out.splitlines() if line.startswith("  ")]
    out = tmp_path / "out"
    assert broken[0] == f"{out / parquet.relative_to(src)}: data parquet is unreadable" + broken[0].split(
        "unreadable")[1] and "episode 0 and any others it holds" in broken[0]
    left = [b for b in broken if LEFT in b]
    assert len(left) == 8 and all("is missing" in b for b in left)
    assert len(broken) == 9  # the other cameras decode for every episode's range
    assert not (out / "images").exists() and (src / "images").exists()


@pytest.fixture
def v21(demos_source, tmp_path):
    return export_v21(demos_source, tmp_path / "v21")


def _rewrite_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_ingest_converts_v21_with_partial_action_config(demos_source, v21, tmp_path):
    rows = [json.loads(line) for line in (v21 / "meta" / "episodes.jsonl").read_text().splitlines()]
    for r in rows[1:]:
        del r["action_config"]
    _rewrite_jsonl(v21 / "meta" / "episodes.jsonl", rows)
    before = tree_digest(v21)
    result = ingest(IngestConfig(source=str(v21), output=str(tmp_path / "out")))
    assert tree_digest(v21) == before and result.broken == []
    assert result.notes == ["episodes 1, 2, 3, 4, 5 (5 of 6) had no action_config: given an empty one"]
    out, src = LeRobotData(tmp_path / "out"), LeRobotData(demos_source)
    assert out.episodes[0].action_config == src.episodes[0].action_config
    assert [m.action_config for m in out.episodes[1:]] == [[]] * 5


def test_ingest_renumbers_v21_episode_gaps(demos_source, v21, tmp_path):
    rows = [json.loads(line) for line in (v21 / "meta" / "episodes.jsonl").read_text().splitlines()]
    _rewrite_jsonl(v21 / "meta" / "episodes.jsonl", [r for r in rows if r["episode_index"] != 2])
    stats = [json.loads(line) for line in (v21 / "meta" / "episodes_stats.jsonl").read_text().splitlines()]
    _rewrite_jsonl(v21 / "meta" / "episodes_stats.jsonl", [r for r in stats if r["episode_index"] != 2])
    for path in v21.rglob("episode_000002.*"):
        path.unlink()
    result = ingest(IngestConfig(source=str(v21), output=str(tmp_path / "out")))
    assert result.episodes == 5 and result.broken == []
    assert result.notes == ["episode indices 3, 4, 5 renumbered to 2, 3, 4 (the source's indices have gaps)"]
    out, src = LeRobotData(tmp_path / "out"), LeRobotData(demos_source)
    for new, old in ((1, 1), (2, 3), (4, 5)):
        np.testing.assert_array_equal(out.arrays(new)["action"], src.arrays(old)["action"])
        assert out.episodes[new].action_config == src.episodes[old].action_config
    np.testing.assert_array_equal(out.video(2, "observation.images.top"), src.video(3, "observation.images.top"))
    assert pq.read_table(out.data_file(2)).column("index").to_pylist() == list(range(sum(
        m.length for m in out.episodes)))

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    assert LeRobotDataset("local/out", root=tmp_path / "out").num_episodes == 5


def test_ingest_v21_it_cannot_convert_ends_in_one_line(v21, tmp_path):
    (v21 / "videos" / "chunk-000" / "observation.images.top" / "episode_000004.mp4").unlink()
    proc = vaops("ingest", "--source", str(v21), "--output", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "episodes.jsonl: episodes 4 have no observation.images.top mp4 "
        f"(looked for episode_000004.* under {v21})")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))

    shutil.copyfile(v21 / "videos" / "chunk-000" / "observation.images.top" / "episode_000003.mp4",
                    v21 / "videos" / "chunk-000" / "observation.images.top" / "episode_000004.mp4")
    (v21 / "data" / "chunk-000" / "episode_000001.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DatasetError, match=r"lerobot's v2.1 -> v3.0 converter failed \(ArrowInvalid"):
        ingest(IngestConfig(source=str(v21), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_validate_needs_a_dataset_and_help_shows_one_default(capfd):
    assert cli("validate") == 2 and "vaops validate: error: dataset is required" in capfd.readouterr().err
    with pytest.raises(SystemExit):
        cli("validate", "--help")
    help_text = " ".join(capfd.readouterr().out.split())
    assert "(default: the declared one)" not in help_text and "aloha, libero, robotwin" in help_text
