"""`vaops serve --fp8` on a CPU: the same FP8 block products through oneDNN (for FP8's numbers), with a warning that it is slow."""
import logging

import torch

from vaops.models.checkpoint import build_random_weights
from vaops.models.config import get_preset
from vaops.models.fp8 import FP8Linear
from vaops.serving.config import ServeConfig
from vaops.serving.server import model_from_weights


def test_fp8_serving_on_a_cpu_swaps_the_blocks_and_says_it_is_slow(caplog):
    weights = build_random_weights(get_preset("tiny"), seed=0, dtype=torch.bfloat16)
    cfg = ServeConfig(model="(in memory)", dtype="bfloat16", fp8=True, warmup=False).validate()
    with caplog.at_level(logging.INFO, logger="vaops.serving.server"):
        model_from_weights(cfg, weights)
    assert isinstance(weights.transformer.blocks[0].ffn.net[2], FP8Linear)
    assert "FP8 on a CPU runs oneDNN's FP8 products" in caplog.text
