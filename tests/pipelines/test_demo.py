"""`vaops demo`'s choice of start and its pipeline parameters (no pipeline runs here: the tiny demo's
flow runs in test_pipeline.py, the small policy's is measured in bench/results/demo_small_policy.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from vaops.models.model_source import SHIPPED_FILE
from vaops.pipelines import demo


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "small-aloha"
    monkeypatch.setattr(demo, "SHIPPED_POLICY", folder)
    return folder


def test_the_demo_starts_from_the_shipped_policy_only_when_it_is_there(shipped):
    assert demo.default_preset() == "tiny"
    assert demo.config_from_args(_args()) == demo.PRESETS["tiny"]
    shipped.mkdir()
    (shipped / SHIPPED_FILE).write_text("{}")
    assert demo.default_preset() == "small-policy"
    assert demo.config_from_args(_args()) == demo.PRESETS["small-policy"]
    assert demo.config_from_args(_args("--preset", "tiny")) == demo.PRESETS["tiny"]


def test_flags_override_the_chosen_preset(shipped):
    cfg = demo.config_from_args(_args("--preset", "small-policy", "--eval-episodes", "4", "--train-steps", "2",
                                      "--base-checkpoint", "/models/other"))
    assert (cfg.eval_episodes, cfg.train_steps, cfg.base_checkpoint) == (4, 2, Path("/models/other"))
    assert cfg.threshold == 0.5 and cfg.preset == "small"
    # A folder to start from picks the preset that post-trains one, when no preset is named.
    assert demo.config_from_args(_args("--base-checkpoint", "/models/other")).preset == "small"
    with pytest.raises(ValueError, match="--base-checkpoint needs a preset that post-trains a policy"):
        demo.config_from_args(_args("--preset", "tiny", "--base-checkpoint", "/models/other"))


def test_pipeline_arguments_of_each_start():
    tiny = demo.pipeline_arguments(demo.PRESETS["tiny"], "abc")
    assert "base_checkpoint" not in tiny and tiny["preset"] == "tiny" and tiny["threshold"] == 0.0
    assert tiny["dvc_path"] == "data/demos" and tiny["train_config"] == {"steps": 60}

    small = demo.PRESETS["small-policy"]
    args = demo.pipeline_arguments(small, "abc")
    assert args["base_checkpoint"] == str(small.base_checkpoint.absolute()) and args["preset"] == "small"
    assert (args["eval_preset"], args["eval_episodes"], args["eval_max_steps"], args["threshold"]) == \
        ("transfer_cube", 0, 0, 0.5)  # 0: the eval preset's
    ev = demo.evaluation(small)
    assert (ev.tasks, ev.episodes, ev.max_steps) == (("AlohaTransferCube-v0",), 10, 100)
    assert "5/10 AlohaTransferCube-v0 episodes solved" in demo.evaluation_line(small, 0.5)
    assert args["train_config"]["steps"] == small.train_steps and args["train_config"]["lr"] == 1e-5
    assert args["train_config"]["norm_stats"] == "base"  # the policy's action scale, not 4 demos'
    assert args["augment_copies"] == 0 and args["dvc_path"] != tiny["dvc_path"]  # one registry, two datasets
    # The demos are recorded as the small preset's training data was (its camera size and length).
    cmd = demo.demos_command(small)
    assert cmd[cmd.index("--preset") + 1] == "small" and "--time-scale" not in cmd
    assert demo.demos_command(demo.PRESETS["tiny"])[-2:] == ["--time-scale", "0.6"]


def test_every_pipeline_argument_is_a_pipeline_parameter():
    from vaops.pipelines.run import parameters

    known = set(parameters())
    for name, cfg in demo.PRESETS.items():
        assert set(demo.pipeline_arguments(cfg, "abc")) <= known, name
