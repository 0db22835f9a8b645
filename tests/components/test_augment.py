"""augment: originals kept byte for byte, copies marked, every frame of a clip changed alike, seeded."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
from data_support import CAMERA, DEMO_EPISODES, copy_dataset

from vaops.components.augment import transforms
from vaops.components.augment.config import AugmentConfig
from vaops.components.augment.stage import run as augment
from vaops.components.dataset import LeRobotData


def test_augment_keeps_originals_and_marks_copies(demos_source, tmp_path):
    src = copy_dataset(demos_source, tmp_path / "src")
    cfg = AugmentConfig(dataset=str(src), output=str(tmp_path / "aug"), report_dir=str(tmp_path / "rep"),
                        copies=1, seed=7, action_noise_std=0.01)
    result = augment(cfg)
    data, out = LeRobotData(src), LeRobotData(tmp_path / "aug")
    assert len(out.episodes) == 2 * DEMO_EPISODES and result.originals == DEMO_EPISODES
    for i in range(DEMO_EPISODES):
        original, copy = out.episodes[i], out.episodes[DEMO_EPISODES + i]
        assert original.augmented_from is None and original.augmentation is None
        assert copy.augmented_from == i and copy.seed == data.episodes[i].seed
        # originals: same bytes of video, same numbers
        assert out.video_file(i, CAMERA).read_bytes() == data.video_file(i, CAMERA).read_bytes()
        np.testing.assert_array_equal(out.arrays(i)["action"], data.arrays(i)["action"])
        # copies: actions with the requested noise, same segment bounds, paraphrased texts
        noise = out.arrays(DEMO_EPISODES + i)["action"] - data.arrays(i)["action"]
        assert 0.005 < noise.std() < 0.02
        assert [(s.start_frame, s.end_frame) for s in copy.action_config] == \
            [(s.start_frame, s.end_frame) for s in original.action_config]
        assert all(a.action_text != b.action_text for a, b in zip(copy.action_config, original.action_config))
        assert copy.tasks != original.tasks and copy.tasks[0] == copy.augmentation["paraphrases"][original.tasks[0]]
    rows = [json.loads(line) for line in (tmp_path / "aug" / "meta" / "episodes.jsonl").read_text().splitlines()]
    assert [r.get("augmented_from") for r in rows] == [None] * DEMO_EPISODES + list(range(DEMO_EPISODES))
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(report["augmented"]) == DEMO_EPISODES
    assert (tmp_path / "rep" / "preview.png").stat().st_size > 10_000
    assert "](preview.png)" in (tmp_path / "rep" / "report.md").read_text()

    # the augmented frames are the originals under one transform (up to video coding loss)
    aug = out.episodes[DEMO_EPISODES].augmentation
    params = transforms.VisualParams(aug["brightness"], aug["contrast"], aug["saturation"], aug["hue"],
                                     tuple(aug["shift"]))
    expected = transforms.apply_visual(data.video(0, CAMERA), params).astype(np.float32)
    got = out.video(DEMO_EPISODES, CAMERA).astype(np.float32)
    assert np.abs(expected - got).mean() < 4.0
    assert np.abs(data.video(0, CAMERA).astype(np.float32) - got).mean() > np.abs(expected - got).mean() + 1

    # seeded: the same seed draws the same copies, another seed others
    again = augment(replace(cfg, output=str(tmp_path / "again"), report_dir=str(tmp_path / "rep2")))
    assert again.augmented == result.augmented
    other = augment(replace(cfg, seed=8, output=str(tmp_path / "other"), report_dir=str(tmp_path / "rep3")))
    assert other.augmented[0]["brightness"] != result.augmented[0]["brightness"]



def test_augment_without_copies_names_no_preview(demos_source, tmp_path):
    """The demo's `augment_copies=0`: no contact sheet is drawn, so the report names none (its
    report.html showed a broken image; tests/pipelines/test_reports_in_browser.py opens the pages)."""
    src = copy_dataset(demos_source, tmp_path / "src")
    augment(AugmentConfig(dataset=str(src), output=str(tmp_path / "aug"), report_dir=str(tmp_path / "rep"), copies=0))
    assert not (tmp_path / "rep" / "preview.png").exists()
    assert "preview.png" not in (tmp_path / "rep" / "report.md").read_text()
    assert "<img" not in (tmp_path / "rep" / "report.html").read_text()

def test_visual_augmentation_is_the_same_for_every_frame():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (1, 32, 40, 3), dtype=np.uint8)
    clip = np.concatenate([frame] * 5)
    params = transforms.draw_visual(np.random.default_rng(3), 0.3, 0.3, 0.3, 0.05, 3)
    out = transforms.apply_visual(clip, params)
    assert out.shape == clip.shape and out.dtype == np.uint8
    assert all(np.array_equal(out[0], out[t]) for t in range(5))
    assert not np.array_equal(out[0], clip[0])
    shifted = transforms.apply_visual(clip, transforms.VisualParams(1, 1, 1, 0, (2, -1)))
    np.testing.assert_array_equal(shifted[:, 2:, :-1], clip[:, :-2, 1:])


def test_paraphrases_keep_the_meaning_words():
    text = "Transfer the red cube from the right arm to the left arm."
    seen = {transforms.paraphrase(text, np.random.default_rng(s)) for s in range(20)}
    assert len(seen) > 5 and text not in seen
    for p in seen:
        assert "red" in p and "right" in p and "left" in p and p.endswith(".")
        assert any(w in p.lower() for w in ("cube", "block", "box"))
