"""The post-training loader over the released latent layout: layouts, action alignment, errors."""

import json
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy.spatial.transform import Rotation

from vaops.components.train.data import (
    LatentDataset,
    ResumableSampler,
    collate,
    index_segments,
    load_latent_file,
    window_start,
)
from vaops.components.train.synthetic import write_synthetic_latent_dataset
from vaops.models.config import get_preset

TINY = get_preset("tiny")
# The published camera layouts with the tiny transformer, VAE and text sizes.
ROBOTWIN = get_preset("robotwin").replace(transformer=TINY.transformer, vae=TINY.vae, text_encoder=TINY.text_encoder)
LIBERO = get_preset("libero").replace(transformer=TINY.transformer, vae=TINY.vae, text_encoder=TINY.text_encoder,
                                      action_per_frame=16)

pytestmark = pytest.mark.xdist_group("train-data")


@pytest.fixture(scope="module")
def robotwin_ds(tmp_path_factory):
    return write_synthetic_latent_dataset(tmp_path_factory.mktemp("rt") / "ds", ROBOTWIN, episodes=2,
                                          latent_frames=3, segments_per_episode=2, seed=1)


@pytest.fixture
def tiny_ds(tmp_path):
    return write_synthetic_latent_dataset(tmp_path / "ds", TINY, episodes=2, latent_frames=4, seed=2)


def _episode_actions(root, episode):
    table = pq.read_table(root / "data" / "chunk-000" / f"episode_{episode:06d}.parquet")
    return np.stack(table.column("action").to_pylist()).astype(np.float64)


def test_tshape_layout_puts_wrists_side_by_side_above_the_high_camera(robotwin_ds):
    ds = LatentDataset(robotwin_ds, ROBOTWIN)
    assert len(ds) == 4
    seg = ds.segments[3]
    sample = ds[3]
    assert sample.latents.shape == (48, 3, *ROBOTWIN.latent_hw) == (48, 3, 24, 20)
    raw = {}
    for cam, path in zip(ROBOTWIN.cameras, seg.files):
        d = torch.load(path, weights_only=True)
        raw[cam.key] = d["latent"].float().view(3, d["latent_height"], d["latent_width"], 48).permute(3, 0, 1, 2)
    high, left, right = (raw[c.key] for c in ROBOTWIN.cameras)
    assert torch.equal(sample.latents[:, :, :8, :10], left)
    assert torch.equal(sample.latents[:, :, :8, 10:], right)
    assert torch.equal(sample.latents[:, :, 8:, :], high)


def test_robotwin_actions_align_to_latent_frames_relative_and_normalised(robotwin_ds):
    ds = LatentDataset(robotwin_ds, ROBOTWIN)
    seg = ds.segments[1]  # episode 0, second segment: frame_ids do not start at 0
    sample = ds[1]
    frame_ids = torch.load(seg.files[0], weights_only=True)["frame_ids"]
    assert frame_ids[0] == seg.start > 0
    stats = json.loads((robotwin_ds / "meta" / "norm_stats.json").read_text())
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    raw = _episode_actions(robotwin_ds, seg.episode)
    n = 16
    # Latent frame k >= 1 holds the n actions from frame_ids[0] + (k-1) n; poses relative to frame_ids[0].
    window = raw[frame_ids[0]:frame_ids[0] + 2 * n]
    model = np.zeros((2 * n, 30))
    for src, dst in ((0, 0), (8, 7)):
        model[:, dst:dst + 3] = window[:, src:src + 3] - window[:1, src:src + 3]
        first = Rotation.from_quat(np.repeat(window[:1, src + 3:src + 7], len(window), axis=0))
        model[:, dst + 3:dst + 7] = (first.inv() * Rotation.from_quat(window[:, src + 3:src + 7])).as_quat()
    model[:, 28], model[:, 29] = window[:, 7], window[:, 15]
    expected = np.clip((model - q01) / (q99 - q01 + 1e-6) * 2 - 1, -1.5, 1.5)
    used = list(ROBOTWIN.used_action_channels)
    got = sample.actions[:, 1:].reshape(30, 2 * n).T.numpy()
    np.testing.assert_allclose(got[:, used], expected[:, used], atol=1e-5)
    assert np.all(got[:, [c for c in range(30) if c not in used]] == 0)
    assert torch.all(sample.actions[:, 0] == 0)  # the first latent frame has no actions
    # The relative pose at the segment's first action is the identity: zero translation, quaternion (0, 0, 0, 1).
    np.testing.assert_allclose(model[0, [0, 1, 2, 3, 4, 5, 6]], [0, 0, 0, 0, 0, 0, 1], atol=1e-12)
    assert sample.action_mask.shape == sample.actions.shape
    assert sample.action_mask[:, 0, 0, 0].tolist() == list(ROBOTWIN.action_mask)
    assert sample.text_emb.shape == (512, 40) and torch.all(sample.text_emb[7:] == 0)
    assert sample.text_emb[:7].abs().sum() > 0


def test_side_by_side_layout_concatenates_cameras_along_the_width(tmp_path):
    root = write_synthetic_latent_dataset(tmp_path / "ds", LIBERO, episodes=1, latent_frames=2, seed=3)
    ds = LatentDataset(root, LIBERO)
    sample = ds[0]
    assert sample.latents.shape == (48, 2, 8, 16)
    for i, path in enumerate(ds.segments[0].files):
        d = torch.load(path, weights_only=True)
        cam = d["latent"].float().view(2, 8, 8, 48).permute(3, 0, 1, 2)
        assert torch.equal(sample.latents[..., 8 * i:8 * (i + 1)], cam)
    assert ds.adapter.eef_poses == ()  # no adapter of LIBERO's channels: actions as recorded, none relative


def test_normalisation_clips_outliers(tiny_ds):
    stats_path = tiny_ds / "meta" / "norm_stats.json"
    stats = json.loads(stats_path.read_text())
    used = list(TINY.used_action_channels)
    q99 = np.array(stats["q99"])
    q01 = np.array(stats["q01"])
    q99[used] = q01[used] + (q99[used] - q01[used]) * 0.1  # a tenth of the range: most values clip
    stats["q99"] = q99.tolist()
    stats_path.write_text(json.dumps(stats))
    sample = LatentDataset(tiny_ds, TINY)[0]
    values = sample.actions[used, 1:]
    assert values.max().item() == pytest.approx(1.5) and values.min().item() >= -1.5
    assert (values == 1.5).float().mean() > 0.3


def test_preload_serves_the_same_samples_without_reading_files(tiny_ds):
    ds = LatentDataset(tiny_ds, TINY)
    fresh = [ds[i] for i in range(len(ds))]
    ds.preload()
    for path in (tiny_ds / "latents").rglob("*.pth"):
        path.unlink()  # a preloaded dataset no longer reads its files
    for i, want in enumerate(fresh):
        got = ds[i]
        for name in ("latents", "actions", "action_mask", "text_emb"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_episodes_parquet_v30_gives_the_same_segments(tiny_ds):
    before = index_segments(tiny_ds, TINY)
    jsonl = tiny_ds / "meta" / "episodes.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    (tiny_ds / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tiny_ds / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    jsonl.unlink()
    assert index_segments(tiny_ds, TINY) == before


def test_segments_without_every_camera_are_skipped_and_none_left_is_an_error(tiny_ds):
    segments = index_segments(tiny_ds, TINY)
    segments[0].files[0].unlink()
    assert index_segments(tiny_ds, TINY) == segments[1:]
    segments[1].files[0].unlink()
    with pytest.raises(FileNotFoundError, match="no segment has latents for cameras"):
        index_segments(tiny_ds, TINY)


def test_bad_inputs_name_the_file(tiny_ds):
    ds = LatentDataset(tiny_ds, TINY)
    with pytest.raises(ValueError, match="preset 'tiny' expects 8"):
        LatentDataset(tiny_ds, TINY.replace(action_per_frame=8))[0]
    with pytest.raises(ValueError, match="latent is 4x6"):
        LatentDataset(tiny_ds, TINY.replace(cameras=(TINY.cameras[0].__class__(TINY.cameras[0].key, 64, 64),)))[0]
    ds.segments[1].files[0].write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=str(ds.segments[1].files[0])):
        ds[1]
    stats_path = tiny_ds / "meta" / "norm_stats.json"
    stats = json.loads(stats_path.read_text())
    stats_path.write_text(json.dumps({**stats, "robot": "robotwin"}))
    with pytest.raises(ValueError, match="robot 'robotwin' fills model channels"):
        LatentDataset(tiny_ds, TINY)
    stats_path.write_text(json.dumps({"q01": [0.0] * 14, "q99": [1.0] * 14}))
    with pytest.raises(ValueError, match="norm_stats.json: q01/q99 must have 30 entries"):
        LatentDataset(tiny_ds, TINY)
    stats_path.unlink()
    with pytest.raises(FileNotFoundError, match="norm_stats.json"):
        LatentDataset(tiny_ds, TINY)


def test_load_latent_file_refuses_pickled_objects(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"latent": torch.zeros(2, 48), "obj": PurePosixPath("elsewhere")}, path)
    with pytest.raises(ValueError, match="x.pth"):
        load_latent_file(path)


def test_collate_keeps_the_common_leading_frames(tmp_path):
    long_ds = write_synthetic_latent_dataset(tmp_path / "a", TINY, episodes=1, latent_frames=5, seed=4)
    short_ds = write_synthetic_latent_dataset(tmp_path / "b", TINY, episodes=1, latent_frames=3, seed=5)
    a, b = LatentDataset(long_ds, TINY)[0], LatentDataset(short_ds, TINY)[0]
    batch = collate([a, b])
    assert batch.latents.shape == (2, 48, 3, 4, 6) and batch.actions.shape == (2, 30, 3, 16, 1)
    assert torch.equal(batch.latents[0], a.latents[:, :3]) and torch.equal(batch.actions[1], b.actions)


def test_max_latent_frames_takes_a_window_drawn_per_visit(tmp_path):
    """A segment longer than max_latent_frames gives a window of that many frames (video, actions and
    mask from the same frames) at a start drawn from (seed, visit): every part of the segment over the
    visits, the same window for the same visit in another dataset (a loader worker, a resumed run) and
    from the preloaded cache."""
    root = write_synthetic_latent_dataset(tmp_path / "ds", TINY, episodes=1, latent_frames=6, seed=4)
    whole = LatentDataset(root, TINY)[0]
    ds = LatentDataset(root, TINY, max_latent_frames=3, seed=7)
    starts = []
    for visit in range(40):  # one segment: visit = epoch
        sample = ds[visit]
        start = window_start(6, 3, 7, visit)
        span = slice(start, start + 3)
        assert sample.latents.shape[1] == sample.actions.shape[1] == sample.action_mask.shape[1] == 3
        assert torch.equal(sample.latents, whole.latents[:, span]) and torch.equal(sample.actions, whole.actions[:, span])
        assert torch.equal(sample.action_mask, whole.action_mask[:, span])
        assert torch.equal(sample.text_emb, whole.text_emb)
        starts.append(start)
    assert set(starts) == {0, 1, 2, 3}
    assert starts[:10] != [window_start(6, 3, 8, v) for v in range(10)]  # another seed, other windows
    again = LatentDataset(root, TINY, max_latent_frames=3, seed=7)
    again.preload()
    assert all(torch.equal(again[v].latents, ds[v].latents) for v in range(40))
    assert torch.equal(LatentDataset(root, TINY, max_latent_frames=6, seed=7)[5].latents, whole.latents)  # fits


def test_windows_reach_a_segments_ends_as_often_as_its_middle():
    """Starts drawn over -(window-1)..frames-1 and clamped: at 40 frames and windows of 16 every frame is
    in at least 16 of 55 draws (29%); uniform starts would put the first frame in 1 of 25 (4%)."""
    starts = torch.tensor([window_start(40, 16, 0, v) for v in range(4000)])
    assert starts.min() == 0 and starts.max() == 24 and len(starts.unique()) == 25
    covered = torch.stack([(starts <= j) & (starts > j - 16) for j in range(40)]).float().mean(1)
    assert covered.min() > 16 / 55 - 0.04 and covered.max() < 31 / 55 + 0.04  # 31 of 55: frames 15 and 24


def test_resumable_sampler_continues_the_stream_and_splits_ranks():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(ResumableSampler(10, seed=3), 25)
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10, 20))  # epoch * 10 + index
    assert [v % 10 for v in full[:10]] != [v % 10 for v in full[10:20]]  # a new permutation per epoch
    assert take(ResumableSampler(10, seed=3, start=7), 18) == full[7:]
    r0, r1 = take(ResumableSampler(10, 3, 0, 2), 5), take(ResumableSampler(10, 3, 1, 2), 5)
    assert sorted(r0 + r1) == list(range(10))
    assert take(ResumableSampler(10, 3, 1, 2, start=3), 4) == take(ResumableSampler(10, 3, 1, 2), 7)[3:]


def test_the_encode_stages_output_loads_aligned_and_trains(demos_source, tmp_path, monkeypatch):
    from vaops.components.dataset import LeRobotData
    from vaops.components.encode.config import EncodeConfig
    from vaops.components.encode.stage import run as encode
    from vaops.components.train.config import get_recipe
    from vaops.components.train.trainer import run as train

    out = tmp_path / "encoded"
    encode(EncodeConfig(dataset=str(demos_source), output=str(out), report_dir=str(tmp_path / "report")))
    ds = LatentDataset(out, TINY)
    data = LeRobotData(out)
    assert len(ds) == sum(len(m.action_config) for m in data.episodes) > 0
    stats = json.loads((out / "meta" / "norm_stats.json").read_text())
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    used = list(TINY.used_action_channels)
    for i, seg in enumerate(ds.segments):
        sample = ds[i]
        f = sample.latents.shape[1]
        assert sample.latents.shape == (48, f, 4, 6) and f >= 2
        frame_ids = torch.load(seg.files[0], weights_only=True)["frame_ids"]
        raw = data.arrays(seg.episode)["action"][frame_ids[0]:frame_ids[0] + (f - 1) * 16].astype(np.float64)
        expected = np.clip((raw - q01[used]) / (q99[used] - q01[used] + 1e-6) * 2 - 1, -1.5, 1.5)
        got = sample.actions[used, 1:].reshape(len(used), -1).T.numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert torch.all(sample.actions[:, 0] == 0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(get_recipe("tiny").replace(dataset=str(out), output=str(tmp_path / "run"), steps=3,
                                                  save_every=3, system_metrics=False, log_checkpoints="none"))
    finally:
        torch.set_num_threads(threads)
    assert result.steps == 3 and np.isfinite(result.final_loss)
