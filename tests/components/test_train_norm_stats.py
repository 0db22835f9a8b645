"""Post-training keeps a trained policy's action normalisation when asked (`norm_stats: base`): the
actions are normalised with the base checkpoint's q01/q99 and its policy.json keeps them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vaops.components.train.config import TrainConfig
from vaops.components.train.data import LatentDataset
from vaops.components.train.synthetic import write_synthetic_latent_dataset
from vaops.components.train.trainer import resolve_preset
from vaops.models.checkpoint import read_preset, write_tiny_checkpoint
from vaops.models.config import get_preset

TINY = get_preset("tiny")


@pytest.fixture
def data(tmp_path):
    return write_synthetic_latent_dataset(tmp_path / "ds", TINY, episodes=2, latent_frames=4, seed=2)


def test_base_stats_are_kept_and_applied(data, tmp_path):
    base = write_tiny_checkpoint(tmp_path / "base", seed=0)
    own = read_preset(base)
    stats = json.loads((data / "meta" / "norm_stats.json").read_text())
    assert stats["q01"] != list(own.norm_q01)  # the dataset's differ from the base's

    kept, _ = resolve_preset(TrainConfig(init_from=str(base), norm_stats="base"), data)
    assert (kept.norm_q01, kept.norm_q99) == (own.norm_q01, own.norm_q99)
    fitted, _ = resolve_preset(TrainConfig(init_from=str(base)), data)
    assert list(fitted.norm_q01) == stats["q01"] and list(fitted.norm_q99) == stats["q99"]
    with pytest.raises(ValueError, match="norm_stats 'base' needs init_from"):
        resolve_preset(TrainConfig(norm_stats="base"), data)


def test_the_dataset_normalises_with_the_stats_it_is_given(data):
    used = list(TINY.used_action_channels)
    stats = json.loads((data / "meta" / "norm_stats.json").read_text())
    q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
    q99[used] = q01[used] + (q99[used] - q01[used]) * 0.1  # a tenth of the range: most values clip
    given = LatentDataset(data, TINY, norm=(tuple(q01), tuple(q99)))[0].actions[used, 1:]
    own = LatentDataset(data, TINY)[0].actions[used, 1:]
    assert (given == 1.5).float().mean() > 0.3 and (own == 1.5).float().mean() < 0.1
