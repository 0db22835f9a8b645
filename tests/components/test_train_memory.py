"""The 5 B recipes' execution fitted to the GPUs' memory (components/train/memory.py): the fastest
measured execution predicted to fit, a one-line refusal when none does, and a run's own execution kept."""

from __future__ import annotations

import dataclasses

import pytest

from vaops.components.train.config import get_recipe
from vaops.components.train.memory import EXECUTIONS, fitted, parameter_count, sample_tokens
from vaops.models.config import get_preset

ROBOTWIN = get_preset("robotwin")
H200, H100 = 139.8, 79.6  # GiB, as torch reports them


def chosen(gib: float, gpus: int, **changes) -> str:
    cfg = dataclasses.replace(get_recipe("robotwin"), **changes)
    fit, execution = fitted(cfg, ROBOTWIN, gpus, gib)
    assert execution is not None and all(getattr(fit, k) == v for k, v in execution.fields.items())
    return execution.name


def test_each_gpu_count_gets_the_fastest_execution_predicted_to_fit():
    mb2, mb1, z2ckpt, z3 = (e.name for e in EXECUTIONS)
    # One H200 ran micro-batch 2 at a 130.3 GiB peak and out of memory once: micro-batch 1 (104.4 GiB).
    assert [chosen(H200, n) for n in (1, 2, 4, 8)] == [mb1, mb2, mb2, mb2]
    # 80 GB GPUs: the recipe as shipped (98.5 GiB on 2) does not fit at any count up to 8.
    assert [chosen(H100, n) for n in (2, 4, 8)] == [mb1, mb1, mb1]
    assert chosen(94.0, 1) == z3 and chosen(48.0, 4) == z2ckpt


def test_no_execution_fits_is_one_line_naming_what_would():
    with pytest.raises(ValueError) as e:
        chosen(H100, 1)
    message = str(e.value)
    assert "\n" not in message and "preset 'robotwin' needs about 83 GiB per GPU on 1 GPU(s)" in message
    assert "use at least 2 GPUs of this size" in message


def test_a_runs_own_execution_is_kept():
    recipe = get_recipe("robotwin")
    for changes in ({"micro_batch": 3}, {"zero_stage": 3, "compile_blocks": False}, {"offload_optimizer": True},
                    {"max_latent_frames": None}):
        cfg = dataclasses.replace(recipe, **changes)
        assert fitted(cfg, ROBOTWIN, 1, H100) == (cfg, None)


def test_the_model_covers_every_measured_peak():
    """Peaks of bench/train_step.py on H200s (bench/results/train_step_h200*.json): the prediction is at
    least the measurement and at most 4 GiB above it."""
    params, tokens = parameter_count(ROBOTWIN), sample_tokens(ROBOTWIN, 16)
    assert tokens == 4352 and abs(params - 5.09e9) < 0.01e9
    mb2, mb1, z2ckpt, z3 = EXECUTIONS
    measured = [(mb2, 1, 130.3), (mb2, 2, 98.5), (mb1, 1, 104.4), (z2ckpt, 1, 104.4), (z2ckpt, 2, 57.0),
                (z3, 1, 82.6), (z3, 2, 44.5)]
    for execution, gpus, peak in measured:
        predicted = execution.peak_gib(gpus, params, tokens)
        assert peak <= predicted + 0.15 <= peak + 4, (execution.name, gpus, predicted, peak)
    # micro-batch 3 on 2 GPUs (127.7 GiB): one more sample's activations
    assert mb2.peak_gib(2, params, tokens) + mb2.per_sample_gib >= 127.7


def test_the_trainer_plans_with_the_gpus_memory_and_count(monkeypatch):
    import types

    import torch

    from vaops.components.train.distributed import DistInfo
    from vaops.components.train.trainer import fit_to_gpus

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=80e9))
    recipe = get_recipe("robotwin")
    cfg, execution = fit_to_gpus(recipe, ROBOTWIN, DistInfo(0, 4, 0, torch.device("cuda", 0)))
    assert execution is EXECUTIONS[1] and cfg.micro_batch == 1 and cfg.compile_blocks
    with pytest.raises(ValueError, match="on 1 GPU"):
        fit_to_gpus(recipe, ROBOTWIN, DistInfo(0, 1, 0, torch.device("cuda", 0)))
    assert fit_to_gpus(recipe, ROBOTWIN, DistInfo(0, 1, 0, torch.device("cpu"))) == (recipe, None)


def test_fit_execution_false_and_a_smaller_memory_budget(monkeypatch):
    """`fit_execution: false` runs the recipe's execution as configured (a flag equal to the recipe's value
    cannot say so); `gpu_memory_gib` plans for less than the device has and caps the process there."""
    import types

    import torch

    from vaops.components.train.distributed import DistInfo
    from vaops.components.train.trainer import fit_to_gpus

    recipe = get_recipe("robotwin")
    assert fitted(dataclasses.replace(recipe, fit_execution=False), ROBOTWIN, 1, H100)[1] is None
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        total_memory=H200 * 2**30))
    fractions = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: fractions.append(f))
    gpu = DistInfo(0, 2, 0, torch.device("cuda", 0))
    assert fit_to_gpus(recipe, ROBOTWIN, gpu)[1] is EXECUTIONS[0] and fractions == []
    cfg, execution = fit_to_gpus(dataclasses.replace(recipe, gpu_memory_gib=H100), ROBOTWIN, gpu)
    assert execution is EXECUTIONS[1] and fractions == [pytest.approx(H100 / H200)]


def test_the_forward_dynamics_segment_counts_in_a_samples_tokens():
    assert sample_tokens(ROBOTWIN, 16, forward_dynamics=True) == 4352 + 16 * 16


def test_a_memory_budget_must_be_positive():
    with pytest.raises(ValueError, match="train config: gpu_memory_gib must be > 0, got 0.0"):
        dataclasses.replace(get_recipe("robotwin"), gpu_memory_gib=0.0)
