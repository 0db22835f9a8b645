"""Fit the 5 B recipes' execution to the GPUs' memory: the fastest measured execution whose predicted
peak fits, or a one-line refusal before anything loads.

The recipes' execution (config.SCALE_OUT_EXECUTION: ZeRO-2, no activation checkpointing, compiled blocks,
micro-batch 2) peaked at 98.5 GiB per GPU on 2 H200s and 130.3 GiB on one, so as shipped it would run
out of memory on 80 GB GPUs at any count up to 8; on a single H200 it ran out of memory in the bench's
gradient-accumulation run (bench/results/train_step_h200x2_accum.json).
A run that keeps the recipe's execution unchanged gets the first of these that fits; a run that sets any
of its fields to another value, or `fit_execution: false`, keeps its own.

Each execution's peak per GPU is modelled as `fixed + partitioned / gpus + per_sample * micro_batch`
(GiB at 5.09 B parameters and 4,352 tokens a sample: robotwin, 16 latent frames), fitted to
bench/train_step.py's peaks on H200s (bench/results/train_step_h200*.json), and scaled by the parameters
and by the tokens of a sample:

| execution | measured peaks (GPUs, micro-batch: GiB) | fixed | partitioned | per sample |
| --- | --- | ---: | ---: | ---: |
| ZeRO-2, compiled, mb 2 / mb 1 | (1, 2): 130.3; (1, 1): 104.4 (ZeRO-1); (2, 2): 98.5; (2, 3): 127.7 | 11.6 | 63.6 | 29.2 |
| ZeRO-2, checkpointing, mb 1 | (1, 1): 104.4; (1, 4): 104.4; (2, 1): 57.0 | 8.6 | 94.8 | 1.0 |
| ZeRO-3, checkpointing, mb 1 | (1, 1): 82.6; (2, 1): 44.5 | 5.4 | 76.2 | 1.0 |

(The first row's fixed term is 3.3 GiB above the fit through its mb-2 points, so that the ZeRO-1 mb-1 peak
is covered too.) The plan keeps `HEADROOM` of the memory free for the variation of real data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from vaops.models.config import Preset

from .config import SCALE_OUT_EXECUTION, TrainConfig

REFERENCE_PARAMS = 5.09e9
REFERENCE_SAMPLE_TOKENS = 4352
HEADROOM = 0.08  # of the GPU's memory left free by the plan


@dataclass(frozen=True)
class Execution:
    name: str
    fields: dict  # TrainConfig fields
    fixed_gib: float
    partitioned_gib: float
    per_sample_gib: float

    def peak_gib(self, gpus: int, params: float, sample_tokens: int) -> float:
        scale = params / REFERENCE_PARAMS
        samples = self.fields["micro_batch"] * sample_tokens / REFERENCE_SAMPLE_TOKENS
        return scale * (self.fixed_gib + self.partitioned_gib / gpus) + self.per_sample_gib * samples


# The recipes' execution as measured (its max_latent_frames bounds the tokens, not the execution), and the
# measured ones that need less memory, each a change of it: one source for the fields the plan changes.
_RECIPE = {k: v for k, v in SCALE_OUT_EXECUTION.items() if k != "max_latent_frames"}
_MB1 = {**_RECIPE, "micro_batch": 1}
_CHECKPOINTED = {**_MB1, "activation_checkpointing": True, "compile_blocks": False}

# Fastest first (bench/results/train_step_h200x2.md, tokens/s per GPU on 2 H200s: 11,558; about 10,000;
# 6,303; about 3,100).
EXECUTIONS = (
    Execution("ZeRO-2, compiled blocks, micro-batch 2", _RECIPE, 11.6, 63.6, 29.2),
    Execution("ZeRO-2, compiled blocks, micro-batch 1", _MB1, 11.6, 63.6, 29.2),
    Execution("ZeRO-2, activation checkpointing, micro-batch 1", _CHECKPOINTED, 8.6, 94.8, 1.0),
    Execution("ZeRO-3, activation checkpointing, micro-batch 1", {**_CHECKPOINTED, "zero_stage": 3}, 5.4, 76.2, 1.0),
)


def sample_tokens(preset: Preset, latent_frames: int, forward_dynamics: bool = False) -> int:
    """Tokens of one teacher-forced sample: noisy and clean video and actions of `latent_frames` frames,
    and with `forward_dynamics` the actions once more (objective.py's forward-dynamics segment)."""
    h, w = preset.latent_hw
    _, ph, pw = preset.transformer.patch_size
    actions = (3 if forward_dynamics else 2) * preset.action_per_frame
    return latent_frames * (2 * (h // ph) * (w // pw) + actions)


def parameter_count(preset: Preset) -> int:
    from vaops.models.transformer import build_transformer

    return sum(p.numel() for p in build_transformer(preset.transformer, seed=None, device="meta").parameters())


def plan(gpus: int, gpu_gib: float, params: float, tokens: int, what: str) -> Execution:
    """The fastest execution predicted to fit `gpu_gib` per GPU on `gpus` GPUs; ValueError when none does."""
    budget = gpu_gib * (1 - HEADROOM)
    for candidate in EXECUTIONS:
        if candidate.peak_gib(gpus, params, tokens) <= budget:
            return candidate
    least = EXECUTIONS[-1]
    scale = params / REFERENCE_PARAMS
    room = budget - scale * least.fixed_gib - least.per_sample_gib * tokens / REFERENCE_SAMPLE_TOKENS
    need = f"at least {math.ceil(scale * least.partitioned_gib / room)} GPUs of this size" if room > 0 else \
        "GPUs with more memory"
    raise ValueError(
        f"train config: {what} needs about {least.peak_gib(gpus, params, tokens):.0f} GiB per GPU on {gpus} GPU(s) "
        f"even with {least.name} ({tokens} tokens a sample), and these GPUs have {gpu_gib:.0f} GiB "
        f"({100 * HEADROOM:.0f}% kept free): use {need}, fewer max_latent_frames, or set zero_stage, "
        f"activation_checkpointing and micro_batch yourself")


def fitted(cfg: TrainConfig, preset: Preset, gpus: int, gpu_gib: float) -> tuple[TrainConfig, Execution | None]:
    """`cfg` with the fastest execution that fits, when it keeps the recipes' (SCALE_OUT_EXECUTION) and
    bounds a sample's frames; else `cfg` unchanged. Returns the config and the execution chosen (or None)."""
    own = any(getattr(cfg, k) != v for k, v in _RECIPE.items()) or cfg.offload_optimizer or cfg.offload_params
    if own or not cfg.fit_execution or cfg.max_latent_frames is None:
        return cfg, None
    tokens = sample_tokens(preset, cfg.max_latent_frames, cfg.forward_dynamics_prob > 0)
    chosen = plan(gpus, gpu_gib, parameter_count(preset), tokens, f"preset {preset.name!r}")
    return dataclasses.replace(cfg, **chosen.fields), chosen
