"""validate and clean: planted defects are caught with their reasons and nothing else is dropped;
the cleaning rules each do what they say."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from data_support import CAMERA, DEMO_EPISODES, copy_dataset, moving_frames, plant_defects, vaops

from vaops.components.clean import rules
from vaops.components.clean.config import CleanConfig
from vaops.components.clean.stage import run as clean
from vaops.components.dataset import DatasetError, Episode, EpisodeMeta, LeRobotData, Segment, write_dataset
from vaops.components.validate.config import ValidateConfig
from vaops.components.validate.stage import run as run_validate
from vaops.components.validate.stage import validate


def test_planted_defects_are_quarantined_then_dropped_and_nothing_else(demos_source, tmp_path):
    data = copy_dataset(demos_source, tmp_path / "bad")
    planted = plant_defects(data)

    proc = vaops("validate", "--preset", "aloha", "--dataset", str(data), "--report-dir", str(tmp_path / "val"))
    report = json.loads((tmp_path / "val" / "report.json").read_text())
    assert report["usable"] and report["episodes"] == DEMO_EPISODES and report["passed"] == DEMO_EPISODES - 3
    quarantine = {q["episode_index"]: q for q in report["quarantine"]}
    assert set(quarantine) == set(planted)
    for ep, check in planted.items():
        assert [p["check"] for p in quarantine[ep]["problems"]] == [check]
        assert f"episode {ep}: " in proc.stdout
    video = quarantine[1]["problems"][0]
    assert video["field"] == CAMERA and video["file"].endswith(".mp4") and "cannot decode" in video["message"]
    nan = quarantine[2]["problems"][0]
    assert nan["field"] == "action" and nan["file"].endswith(".parquet") and "frame 5" in nan["message"]
    seg = quarantine[3]["problems"][0]
    assert seg["field"] == "action_config[1]" and "outside the episode" in seg["message"]
    md = (tmp_path / "val" / "report.md").read_text()
    assert all(f"| {ep} | {check} |" in md for ep, check in planted.items())

    result = clean(CleanConfig(dataset=str(data), output=str(tmp_path / "clean"), report_dir=str(tmp_path / "cr"),
                               validation_report=str(tmp_path / "val")))
    assert set(result.dropped) == set(planted) and result.kept == DEMO_EPISODES - 3
    crep = json.loads((tmp_path / "cr" / "report.json").read_text())
    reasons = {d["episode_index"]: " ".join(d["reasons"]) for d in crep["dropped"]}
    assert "cannot decode" in reasons[1] and "NaN" in reasons[2] and "outside the episode" in reasons[3]
    assert crep["index_map"] == {"0": 0, "4": 1, "5": 2}
    out = LeRobotData(tmp_path / "clean")
    assert [m.seed for m in out.episodes] == [0, 4, 5]
    # every change is reported: here the idle tail of each kept episode
    assert {c["episode_index"] for c in crep["changed"]} == {0, 4, 5}
    for m, change in zip(out.episodes, crep["changed"]):
        kept = change["changes"][0]
        assert kept.startswith("trimmed idle frames") and m.length < 40
        assert m.action_config[-1].end_frame == m.length


def test_validate_reports_missing_parquet_wrong_fps_and_empty_dataset(demos_source, tmp_path):
    data = copy_dataset(demos_source, tmp_path / "d")
    missing = LeRobotData(data).data_file(4)
    missing.unlink()
    report = validate(ValidateConfig(dataset=str(data), fps=30))
    assert not report.usable
    assert [p.check for p in report.dataset_problems] == ["fps"]
    assert "declared fps is 10, expected 30" in report.dataset_problems[0].message
    problem = report.quarantine[4][0]
    assert problem.check == "parquet" and problem.file == str(missing) and "missing" in problem.message
    # the CLI exits non-zero and says why
    proc = vaops("validate", "--dataset", str(data), "--fps", "30", "--report-dir", str(tmp_path / "r"), check=False)
    assert proc.returncode == 1 and "declared fps is 10, expected 30" in proc.stdout
    assert json.loads((tmp_path / "r" / "report.json").read_text())["usable"] is False

    shutil.rmtree(data / "meta" / "episodes")
    empty = validate(ValidateConfig(dataset=str(data)))
    assert not empty.usable and "no episodes parquet" in empty.dataset_problems[0].message
    proc = vaops("validate", "--dataset", str(tmp_path / "nowhere"), "--report-dir", str(tmp_path / "r2"), check=False)
    assert proc.returncode == 1 and "not a LeRobot dataset" in proc.stdout


def test_clean_fails_clearly_when_validation_found_the_dataset_unusable(demos_source, tmp_path):
    data = copy_dataset(demos_source, tmp_path / "d")
    assert not run_validate(ValidateConfig(dataset=str(data), fps=25, report_dir=str(tmp_path / "v"))).usable
    proc = vaops("clean", "--dataset", str(data), "--output", str(tmp_path / "c"), "--report-dir",
                 str(tmp_path / "cr"), "--validation-report", str(tmp_path / "v"), check=False)
    assert proc.returncode == 2 and "unusable" in proc.stderr and "expected 25" in proc.stderr
    assert not (tmp_path / "c").exists()


def _episode(actions: np.ndarray, success: bool = True, seed: int = 0) -> Episode:
    n = len(actions)
    frames = moving_frames(n, 32, 32, seed)
    meta = EpisodeMeta(0, n, ["move"], [Segment(0, n // 2, "first"), Segment(n // 2, n, "second")],
                       success=success, seed=seed)
    return Episode(meta, {"action": actions.astype(np.float32), "observation.state": actions.astype(np.float32)},
                   {"observation.images.cam": frames}, ["move"] * n)


FEATURES = {"action": {"dtype": "float32", "shape": (2,), "names": None},
            "observation.state": {"dtype": "float32", "shape": (2,), "names": None},
            "observation.images.cam": {"dtype": "video", "shape": (32, 32, 3),
                                       "names": ["height", "width", "channels"]}}


def test_clean_rules_on_a_synthetic_dataset(tmp_path):
    t = np.linspace(0, 1, 30)
    ramp = np.stack([t, 2 * t], axis=1)
    idle = np.concatenate([np.repeat(ramp[:1], 5, axis=0), ramp, np.repeat(ramp[-1:], 6, axis=0)])
    outlier = ramp.copy()
    outlier[10:15, 0] = 50.0  # five frames: longer than a jump (validate's jump_max_frames is 3)
    gripper = ramp * [1.0, 0.5]
    episodes = [
        _episode(ramp, seed=0),                              # 0 kept as is
        _episode(ramp, seed=1),                              # 1 duplicate of 0
        _episode(ramp, success=False, seed=2),               # 2 failed
        _episode(np.zeros((30, 2)), seed=3),                 # 3 static
        _episode(ramp[:5], seed=4),                          # 4 short
        _episode(idle, seed=5),                              # 5 trimmed to the ramp (+1 idle frame each end)
        _episode(outlier, seed=6),                           # 6 one value clipped
        _episode(gripper + [0.0, 0.25], seed=7),             # 7 different gripper range
    ]
    write_dataset(tmp_path / "src", episodes, fps=10, features=FEATURES, robot_type="test")
    result = clean(CleanConfig(dataset=str(tmp_path / "src"), output=str(tmp_path / "out"),
                               report_dir=str(tmp_path / "rep"), gripper_channels=(1,), outlier_quantile=0.05,
                               outlier_margin=1.0, clip_fields=("action",)))
    assert {ep: r[0].split(":")[0].split(" of")[0] for ep, r in result.dropped.items()} == {
        1: "duplicate", 2: "failed", 3: "static", 4: "short"}
    out = LeRobotData(tmp_path / "out")
    assert [m.seed for m in out.episodes] == [0, 5, 6, 7]
    trimmed = out.arrays(1)["action"]
    assert len(trimmed) == 32  # 30 moving frames + 1 idle frame kept at each end
    np.testing.assert_allclose(trimmed[1:-1, 0], t, atol=1e-6)
    assert out.episodes[1].action_config == [Segment(0, 16, "first"), Segment(16, 32, "second")]  # [0,20) [20,41) - 4
    assert "clipped 5 outlier values of action" in result.changed[6]
    assert out.arrays(2)["action"][10, 0] < 5
    # gripper channel 1 spans [0, 2] in most episodes and [0.25, 0.75] in one: mapped to [0, 1] overall
    grip = np.concatenate([out.arrays(i)["action"][:, 1] for i in range(4)])
    assert grip.min() == pytest.approx(0.0, abs=1e-6) and grip.max() == pytest.approx(1.0, abs=1e-6)
    assert any("gripper channels [1]" in c for c in result.changed[7])
    # untouched videos keep their bytes (no re-encoding); the trimmed one is re-encoded
    src = LeRobotData(tmp_path / "src")
    assert out.video_file(0, "observation.images.cam").read_bytes() == \
        src.video_file(0, "observation.images.cam").read_bytes()
    assert len(out.video(1, "observation.images.cam")) == 32
    # the dataset's own frames agree with its metadata
    assert len(pq.read_table(out.data_file(1))) == out.episodes[1].length


def test_rules_as_functions():
    a = np.array([[0, 0], [0, 0], [0, 0], [1, 0], [2, 0], [2, 0], [2, 0]], float)
    assert rules.idle_span(a, 1e-4, keep=0) == (2, 5)
    assert rules.idle_span(a, 1e-4, keep=1) == (1, 6)
    assert rules.action_range(a) == 2.0
    assert rules.fingerprint(a) == rules.fingerprint(a + 1e-9) != rules.fingerprint(a + 1e-3)
    lo, hi = rules.outlier_bounds(np.arange(101.0)[:, None], 0.1, 0.5)
    assert lo[0] == pytest.approx(-30) and hi[0] == pytest.approx(130)
    assert rules.shift_segments([Segment(0, 3, "a"), Segment(3, 7, "b")], 2, 5) == [Segment(0, 1, "a"),
                                                                                     Segment(1, 3, "b")]


def test_write_dataset_refuses_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(DatasetError, match="no episodes"):
        write_dataset(tmp_path / "x", [], fps=10, features=FEATURES, robot_type="test")
    tiny = {**FEATURES, "observation.images.cam": {**FEATURES["observation.images.cam"], "shape": (16, 16, 3)}}
    with pytest.raises(DatasetError, match="below libsvtav1's 32 pixels"):
        write_dataset(tmp_path / "x", [], fps=10, features=tiny, robot_type="test")
    assert list(tmp_path.iterdir()) == []
