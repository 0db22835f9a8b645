"""The `small` preset on CPU: it builds at its size, trains a few steps with its recipe, and one of
its closed-loop chunks drives the ALOHA sim at its camera size. No success is claimed on CPU
(bench/policy_aloha.py trains and measures it on a GPU)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from data_support import copy_dataset

from vaops.components.dataset import DatasetError
from vaops.components.encode.config import EncodeConfig
from vaops.components.encode.stage import run as encode
from vaops.components.evaluate.aloha import AlohaEpisode, camera_size
from vaops.components.train.config import get_recipe
from vaops.components.train.synthetic import write_synthetic_latent_dataset
from vaops.components.train.trainer import run as train
from vaops.models.checkpoint import load_weights, read_preset, write_random_checkpoint
from vaops.models.config import get_preset
from vaops.models.transformer import count_parameters

pytestmark = pytest.mark.xdist_group("small-policy")
SMALL = get_preset("small")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The suite runs two files at once on two cores; timing-sensitive neighbours (the real-time
    # evaluation tests) fail when this file's 21 M-parameter steps take both.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_small_preset_sizes():
    cfg = SMALL.transformer
    d = cfg.attention_head_dim
    # rotary split f/h/w of the released 128-wide heads: every part an even number of dims
    assert (d - 2 * (d // 3), d // 3) == (44, 42)
    assert SMALL.latent_hw == (12, 16)
    assert SMALL.cameras[0].key == "observation.images.top" and SMALL.control_fps == 10
    with torch.device("meta"):
        from vaops.models.transformer import LingBotVATransformer

        n = count_parameters(LingBotVATransformer(cfg))
    assert 15e6 < n < 30e6, n


@pytest.fixture(scope="module")
def trained(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("small")
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    dataset = write_synthetic_latent_dataset(root / "latents", SMALL, episodes=2, latent_frames=4, seed=0)
    base = write_random_checkpoint(root / "base", "small", seed=0)
    cfg = get_recipe("small").replace(
        dataset=str(dataset), output=str(root / "run"), init_from=str(base), steps=2, micro_batch=2,
        warmup_steps=1, save_every=2, num_workers=0, system_metrics=False)  # a warm-up step, then one at full LR
    return base, train(cfg)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_small_recipe_trains_from_scratch(trained):
    base, out = trained
    assert out.steps == 2 and np.isfinite(out.final_loss)
    from vaops.models.transformer import load_transformer

    before = load_transformer(base / "transformer")
    after = load_transformer(f"{out.checkpoint}/transformer")
    assert not torch.equal(before.action_proj_out.weight, after.action_proj_out.weight.float())
    assert read_preset(out.checkpoint).name == "small"


def test_one_closed_loop_chunk_in_the_sim(trained):
    _, out = trained
    weights = load_weights(out.checkpoint)
    # two denoising steps each: the chunk's plumbing, not its quality, is under test on CPU
    weights.preset = weights.preset.replace(sampling=dataclasses.replace(weights.preset.sampling, video_steps=2,
                                                                         action_steps=2))
    policy = weights.new_policy()
    size = camera_size({"cameras": {c.key: [c.height, c.width] for c in SMALL.cameras}})
    assert size == (192, 256)
    env = AlohaEpisode("AlohaTransferCube-v0", seed=10000, max_steps=16, fps=10, size=size)
    obs = env.observation()
    assert obs["observation.images.top"].shape == (192, 256, 3)
    policy.reset(env.prompt, seed=0)
    actions = policy.act({"observation.images.top": obs["observation.images.top"]}).actions
    assert actions.shape == (14, 2, 16) and np.isfinite(actions).all()
    for j in range(16):  # the first chunk's second latent frame, as the episode loop executes it
        env.step(actions[:, 1, j])
    assert env.steps == 16 and env.finished


def test_data_at_another_rate_is_refused_before_any_model(tmp_path, demos_source):
    demos = copy_dataset(demos_source, tmp_path / "demos")
    info = json.loads((demos / "meta" / "info.json").read_text())
    (demos / "meta" / "info.json").write_text(json.dumps({**info, "fps": 5}))
    with pytest.raises(DatasetError, match="fps 5, preset 'small' runs its robot at 10"):
        encode(EncodeConfig(dataset=str(demos), output=str(tmp_path / "enc"), report_dir=str(tmp_path / "r"),
                            model_preset="small"))


def test_the_pipelines_demos_for_the_small_preset(tmp_path):
    """`vaops run --preset small` records the preset's demos: both tasks, at its camera size and control
    rate, one segment per episode with the prompt the evaluation sends."""
    from kfp import dsl

    from vaops.components.dataset import LeRobotData
    from vaops.components.demos import sim
    from vaops.pipelines.steps import dataset_source

    out = dsl.Dataset(name="dataset", uri=str(tmp_path / "demos"), metadata={})
    assert dataset_source.python_func(dataset=out, episodes=1, preset="small", workers=1) == 2
    data = LeRobotData(out.path)
    assert data.fps == SMALL.control_fps and data.video_keys == [SMALL.cameras[0].key]
    assert data.video(0, SMALL.cameras[0].key).shape == (49, 192, 256, 3)
    texts = [[s.action_text for s in m.action_config] for m in data.episodes]
    assert texts == [[sim.TASKS[t].task_text] for t in ("AlohaTransferCube-v0", "AlohaInsertion-v0")]
    assert out.metadata["lineage"]["vaops.data_path"] == "sim:AlohaTransferCube-v0,AlohaInsertion-v0"
