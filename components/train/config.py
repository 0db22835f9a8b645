"""Typed configuration of a post-training run and its named recipes.

A `TrainConfig` says what to train on (a latent dataset directory), where to write (a run
directory: checkpoints, metrics, report), which model (a preset, optionally initialised from a
checkpoint folder) and how (DeepSpeed ZeRO stage, precision, schedule, the teacher-forcing
randomisation of MODEL.md). Recipes are the named starting points; every field can be
overridden from the command line or a YAML/JSON file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from vaops.models.codec import decode, encode

Precision = Literal["auto", "bf16", "fp32"]
AttentionBackend = Literal["auto", "sdpa", "flex"]
LogCheckpoints = Literal["final", "all", "none"]
LRSchedule = Literal["constant", "cosine"]
NormStats = Literal["dataset", "base"]


@dataclass(frozen=True)
class TrainConfig:
    dataset: str | None = None  # latent dataset directory (MODEL.md "Post-training data layout")
    output: str | None = None  # run directory
    preset: str = "tiny"  # model preset; a policy.json in `init_from` takes precedence
    init_from: str | None = None  # checkpoint folder: transformer/ (+ vae/ text_encoder/ tokenizer/ policy.json)

    steps: int = 100  # optimizer steps
    micro_batch: int = 1  # samples per rank per micro-step
    grad_accum: int = 1
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 10  # linear warmup, then constant (upstream's schedule)
    lr_schedule: LRSchedule = "constant"  # after warm-up: constant (upstream) or cosine down to 0.1 lr
    grad_clip: float = 2.0

    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = True
    checkpoint_every: int = 1  # with activation_checkpointing: recompute every n-th block (2: half, "selective")
    compile_blocks: bool = False  # torch.compile the blocks' attention-free regions (GPU, fixed frame count)
    attention: AttentionBackend = "auto"  # auto: flex on GPU, sdpa on CPU
    # On GPUs a run that keeps the recipe's execution (SCALE_OUT_EXECUTION) gets the fastest one predicted to
    # fit their memory (components/train/memory.py); false: run the configured execution as it is.
    fit_execution: bool = True
    gpu_memory_gib: float | None = field(default=None, metadata={"help": (
        "memory per GPU to plan the execution for and to stay within (a shared GPU); default: the device's")})
    seed: int = 0

    # Teacher forcing (MODEL.md "Training"): probabilities and per-step draws.
    text_dropout: float = 0.1
    noisy_history: float = 0.5
    # Hold latent frame 0 (the first observation) clean at t=0 with no loss in the noisy streams, as
    # the engine does in an episode's first chunk. Upstream draws it at a random t like every frame
    # and leans on its pretrained video model; from scratch the first chunk then sees a near-clean
    # first frame (t < 100) in 1 sample of 10, and the policy learns only the average reach.
    hold_first_frame: bool = False
    # Forward dynamics (issue 15): the engine's grounded asynchronous pass denoises a chunk's video
    # attending to the chunk's executed actions (models/engine.py `_reimagine_executing`), which
    # teacher forcing alone never shows a chunk's noisy video.
    forward_dynamics_prob: float = field(default=0.0, metadata={"help": (
        "probability that a chunk's noisy video also sees its own chunk's clean actions (at t=0, after the "
        "history before the chunk): the forward-dynamics loss of the grounded asynchronous mode; "
        "drawn per chunk and sample")})
    chunk_range: tuple[int, int] = (1, 4)
    window_range: tuple[int, int] = (4, 64)
    video_shift: float | None = None  # None: the preset's sampling shift (upstream snr_shift)
    action_shift: float | None = None  # None: the preset's action shift (upstream action_snr_shift)

    # Data
    # At most this many latent frames of a segment per visit (None: whole segments). A longer segment
    # gives a window whose start each visit draws from (seed, visit) (data.py `window_start`): every
    # part of it is trained on across epochs, and a resumed run draws the same windows. It bounds the
    # memory of a run without activation checkpointing (which grows with the frames) and the frame
    # counts compile_blocks compiles for. With hold_first_frame the window's first frame is held: the
    # episode's first observation when the window starts there, else a clean context frame with its
    # executed actions, as the engine's cache holds an observed frame.
    max_latent_frames: int | None = None
    # The actions' normalisation (q01/q99 per channel), which the checkpoint's policy.json keeps:
    # "dataset" (upstream post-training: the latent dataset's meta/norm_stats.json) or "base" (the
    # init_from checkpoint's). A policy already trained keeps "base": its action head learned that
    # scale, and 4 demonstrations of one task spanned as little as 2% of its range on some joints
    # (the post-trained policy then moved at the wrong scale).
    norm_stats: NormStats = "dataset"
    num_workers: int = 2
    preload: bool = False  # read the whole latent dataset into memory before training (datasets that fit)

    # Checkpoints and tracking
    save_every: int = 100
    keep_last: int = 2
    # Stop at a checkpoint once this launch has trained this long; launching again resumes there
    # (machines leased in slices, preemptible nodes). None: run to `steps`.
    time_limit_min: float | None = None
    # False: checkpoints hold the weights only, not DeepSpeed's optimizer state (14 bytes per
    # parameter: 70 GB at 5 B), so a run cannot resume from them; for rehearsals and short runs.
    save_training_state: bool = True
    experiment: str = "vaops-train"
    run_name: str | None = None
    log_checkpoints: LogCheckpoints = "final"
    system_metrics: bool = True
    system_metrics_interval: float = 10.0

    def __post_init__(self):
        def need(cond: bool, what: str):
            if not cond:
                raise ValueError(f"train config: {what}")

        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.micro_batch >= 1, f"micro_batch must be >= 1, got {self.micro_batch}")
        need(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.zero_stage in (0, 1, 2, 3), f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        need(not self.offload_params or self.zero_stage == 3,
             "offload_params needs zero_stage 3 (parameter partitioning)")
        need(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer needs zero_stage >= 1")
        # ZeRO-3 gathers parameters in module hooks, which the compiled regions' full graphs cannot call.
        need(not (self.compile_blocks and self.zero_stage == 3), "compile_blocks needs zero_stage <= 2")
        # The Literal fields' values are checked where a config is read (models/codec.py), and by mypy in code.
        need(self.time_limit_min is None or self.time_limit_min > 0,
             f"time_limit_min must be > 0, got {self.time_limit_min}")
        need(0 <= self.text_dropout <= 1, f"text_dropout must be in [0, 1], got {self.text_dropout}")
        need(0 <= self.noisy_history <= 1, f"noisy_history must be in [0, 1], got {self.noisy_history}")
        need(self.gpu_memory_gib is None or self.gpu_memory_gib > 0,
             f"gpu_memory_gib must be > 0, got {self.gpu_memory_gib}")
        need(0 <= self.forward_dynamics_prob <= 1,
             f"forward_dynamics_prob must be in [0, 1], got {self.forward_dynamics_prob}")
        for name in ("chunk_range", "window_range"):
            lo, hi = getattr(self, name)
            need(1 <= lo <= hi, f"{name} must be (low, high) with 1 <= low <= high, got {(lo, hi)}")
        need(self.save_every >= 1, f"save_every must be >= 1, got {self.save_every}")
        need(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        need(self.max_latent_frames is None or self.max_latent_frames >= 2,
             f"max_latent_frames must be >= 2, got {self.max_latent_frames}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return encode(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config", base: TrainConfig | None = None) -> TrainConfig:
        """`raw`'s fields, on top of `base` (a recipe, `under` them) when given."""
        if base is None or not isinstance(raw, dict):
            return decode(cls, raw, source)
        return decode(cls, {**base.under(raw).to_dict(), **raw}, source)

    def under(self, changes: dict) -> TrainConfig:
        """This recipe as the base of `changes` (raw field values: YAML, kfp parameters or flag text). A
        recipe that compiles its blocks (SCALE_OUT_EXECUTION) runs them uncompiled when the changes ask
        for ZeRO-3 without naming compile_blocks: ZeRO-3's parameter hooks cannot run inside compiled
        regions, and the same request should not fail on one entry point and run on another."""
        if self.compile_blocks and "compile_blocks" not in changes and _number(changes.get("zero_stage")) == 3:
            return self.replace(compile_blocks=False)
        return self

    @classmethod
    def from_file(cls, path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
        """Fields from a YAML or JSON mapping, on top of `base` (a recipe)."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: train config file is missing") from None
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid YAML/JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of train config fields, got {type(raw).__name__}")
        return cls.from_dict(raw, str(path), base or cls())


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# How `vaops train` executes the 5 B presets (robotwin, libero) on one GPU and on several (torchrun,
# a TrainJob): the one place to change once bench/train_step.py (`--config shipped`) has measured
# the candidates on the GPUs that train (issue 14). TrainConfig fields; a run can override each.
# bench/results/train_step_h200x2.md (robotwin, 16-latent-frame samples, 2 H200): ZeRO-2 without
# activation checkpointing, compiled blocks, micro-batch 2 ran 11,558 tokens/s per GPU (1.85x the
# reference) at a 98.5 GiB peak per GPU (130.3 GiB on 1 GPU), where the previous ZeRO-2 with full
# checkpointing at micro-batch 1 ran 6,303 (1.01x). Micro-batch 3 (12,583) peaked at 127.7 GiB, too
# close to an H200's memory once real data varies. Without checkpointing memory grows with the
# frames, and compile_blocks compiles per latent-frame count (dynamic=False), so samples are windows
# of at most the 16 frames measured; ZeRO-3 cannot run compile_blocks.
SCALE_OUT_EXECUTION: dict = {"zero_stage": 2, "activation_checkpointing": False, "checkpoint_every": 1,
                             "compile_blocks": True, "micro_batch": 2, "max_latent_frames": 16}

RECIPES: dict[str, TrainConfig] = {
    # CI and the embedded demo: the tiny preset, short windows, a high learning rate, fp32 on CPU.
    "tiny": TrainConfig(preset="tiny", steps=40, lr=1e-3, warmup_steps=2, zero_stage=2, window_range=(2, 8),
                        save_every=20, num_workers=0, activation_checkpointing=False),
    # The released RoboTwin post-training recipe (upstream va_robotwin_train_cfg).
    "robotwin": TrainConfig(preset="robotwin", steps=50000, lr=1e-5, warmup_steps=10, save_every=1000, keep_last=3,
                            num_workers=8, **SCALE_OUT_EXECUTION),
    # The `small` preset from scratch on the ALOHA sim demos (one GPU): no ZeRO partitioning (the
    # multi-tensor fp32-master AdamW), 2-frame chunks as the policy runs them, a from-scratch LR
    # with a cosine tail, and no activation checkpointing (21 M parameters, ~500 tokens a sample).
    # Micro-batch 128: at 32 an H200 ran 6 steps/s, bound by per-step overhead, not arithmetic.
    "small": TrainConfig(preset="small", steps=4000, micro_batch=128, lr=5e-4, warmup_steps=200,
                         lr_schedule="cosine", weight_decay=0.01, zero_stage=0, activation_checkpointing=False,
                         chunk_range=(2, 2), window_range=(16, 16), hold_first_frame=True, save_every=500, keep_last=2,
                         num_workers=2, preload=True),
    "libero": TrainConfig(preset="libero", steps=50000, lr=1e-5, warmup_steps=10, save_every=1000, keep_last=3,
                          num_workers=8, **SCALE_OUT_EXECUTION),
}


def get_recipe(name: str) -> TrainConfig:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown train recipe {name!r}; choose one of {sorted(RECIPES)}") from None
