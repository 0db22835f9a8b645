"""`run(config) -> TrainOutputs`: the training stage over directories.

Resumes automatically from the newest complete checkpoint in the output folder (weights,
optimizer, LR schedule, step, data position and, through per-micro-step seeds, the random draws),
so re-running a killed command continues its loss curve step for step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vaops.components.stage_cli import progress
from vaops.models.atomic import write_text_atomically
from vaops.models.checkpoint import read_preset
from vaops.models.config import Preset, TransformerConfig, get_preset
from vaops.models.model_source import CHECKPOINT_ARTIFACT
from vaops.models.transformer import count_parameters

from . import checkpointing
from .config import TrainConfig
from .data import LatentDataset, ResumableSampler, collate, read_norm_stats
from .distributed import (
    DistInfo,
    all_mean,
    all_sum,
    barrier,
    build_engine,
    init_distributed,
    pre_step_grad_norm,
    use_bf16,
)
from .memory import Execution, fitted
from .objective import TeacherForcedModel, TeacherForcing, build_model, draw_inputs
from .report import write_report
from .tracking import Tracker

log = logging.getLogger(__name__)

OUTPUTS_FILE = "outputs.json"


@dataclass(frozen=True)
class TrainOutputs:
    checkpoint: str  # the last checkpoint folder (servable)
    run_id: str  # MLflow run
    steps: int
    final_loss: float
    report: str


def read_outputs(output: Path) -> TrainOutputs:
    """The outputs.json a finished run wrote in its folder."""
    return TrainOutputs(**json.loads((Path(output) / OUTPUTS_FILE).read_text()))


def finished_outputs(output: Path, steps: int) -> TrainOutputs | None:
    """The outputs of a run in `output` that already trained `steps` steps, its checkpoint and report
    still there (a launcher need not train it again), else None."""
    try:
        outputs = read_outputs(output)
    except (OSError, ValueError, TypeError):
        return None
    if outputs.steps < steps or not Path(outputs.checkpoint).is_dir() or not Path(outputs.report).is_file():
        return None
    return outputs


def resolve_preset(cfg: TrainConfig, dataset: Path) -> tuple[Preset, Path | None]:
    """The model preset (a base checkpoint's policy.json wins over the named preset) with the
    dataset's normalisation statistics (`norm_stats` "base": the base's own), and the base
    checkpoint folder if any."""
    base = Path(cfg.init_from) if cfg.init_from else None
    if base is None:
        preset = get_preset(cfg.preset)
    elif not (base / "transformer").is_dir():
        raise FileNotFoundError(f"{base}: init_from must be a checkpoint folder with transformer/")
    elif (base / "policy.json").is_file():
        preset = read_preset(base)
    else:
        preset = get_preset(cfg.preset).replace(
            transformer=TransformerConfig.from_file(base / "transformer" / "config.json"))
    if cfg.norm_stats == "base":
        if base is None or not (base / "policy.json").is_file():
            raise ValueError(f"train config: norm_stats 'base' needs init_from with a policy.json, got {base}")
        return preset, base
    stats = read_norm_stats(dataset, preset.transformer.action_dim)
    return preset.replace(norm_q01=tuple(stats["q01"]), norm_q99=tuple(stats["q99"])), base


class TimeLimit:
    """This launch's training time budget; all ranks agree on when it is reached (rank 0's clock)."""

    def __init__(self, minutes: float | None):
        self.end = None if minutes is None else time.monotonic() + 60 * minutes

    def reached(self) -> bool:
        if self.end is None:
            return False
        flag = torch.tensor([float(time.monotonic() >= self.end)])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            if torch.distributed.get_backend() == "nccl":
                flag = flag.cuda()
            torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())


def fit_to_gpus(cfg: TrainConfig, preset: Preset, info: DistInfo) -> tuple[TrainConfig, Execution | None]:
    """On GPUs, the recipe's execution fitted to their memory (components/train/memory.py)."""
    if not info.cuda:
        return cfg, None
    total = torch.cuda.get_device_properties(info.device).total_memory / 2**30
    gib = total if cfg.gpu_memory_gib is None else min(cfg.gpu_memory_gib, total)
    if gib < total:  # the plan's memory is the process's: allocations past it fail as on a smaller GPU
        torch.cuda.set_per_process_memory_fraction(gib / total, info.device)
    cfg, execution = fitted(cfg, preset, info.world, gib)
    if execution is not None and info.is_main:
        log.info("execution for %d GPU(s) of %.0f GiB: %s", info.world, gib, execution.name)
    return cfg, execution


def micro_step_generator(seed: int, rank: int, micro_step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The micro-step's own generator (exact resume needs no saved RNG state), on the device that draws."""
    mixed = np.random.SeedSequence([seed, rank, micro_step]).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(mixed) & (2**63 - 1))


def _loader(dataset: LatentDataset, cfg: TrainConfig, info: DistInfo, micro_steps: int):
    sampler = ResumableSampler(len(dataset), cfg.seed, info.rank, info.world, start=micro_steps * cfg.micro_batch)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=cfg.micro_batch, sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
        pin_memory=info.cuda, prefetch_factor=4 if cfg.num_workers else None))


def run(cfg: TrainConfig) -> TrainOutputs:
    if not cfg.dataset or not cfg.output:
        raise ValueError("train config: dataset and output are required")
    dataset_dir, output = Path(cfg.dataset), Path(cfg.output)
    info = init_distributed()
    bf16 = use_bf16(cfg, info)
    backend = ("flex" if info.cuda else "sdpa") if cfg.attention == "auto" else cfg.attention
    preset, base = resolve_preset(cfg, dataset_dir)
    cfg, execution = fit_to_gpus(cfg, preset, info)
    dataset = LatentDataset(dataset_dir, preset, cfg.max_latent_frames, (preset.norm_q01, preset.norm_q99),
                            seed=cfg.seed)
    dataset.check_rate()
    if cfg.preload:
        dataset.preload(lambda it: progress(iterable=it, total=len(dataset), desc="preload", disable=not info.is_main))
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_partial(output)
    barrier()

    if info.is_main:  # the model build, compilation and loader start take seconds before the first step
        log.info("training preset %r on %d segments of %s: %d steps of micro-batch %d x %d rank(s), %s",
                 preset.name, len(dataset), dataset_dir, cfg.steps, cfg.micro_batch, info.world,
                 "bf16" if bf16 else "fp32")
    transformer = build_model(cfg, preset, base, bf16, info.device)
    module = TeacherForcedModel(transformer, backend)
    engine = build_engine(module, cfg, info, external_params=[transformer.scale_shift_table])
    teacher = TeacherForcing.from_config(cfg, preset).to(info.device)
    n_params = count_parameters(transformer) if cfg.zero_stage < 3 else sum(
        getattr(p, "ds_numel", p.numel()) for p in transformer.parameters())

    latest = checkpointing.latest_checkpoint(output)
    state = checkpointing.TrainerState(world=info.world, config=cfg.to_dict())
    if latest is not None:
        state = checkpointing.load(engine, latest, cfg.to_dict(), info.world)
        log.info("resuming from %s (step %d)", latest, state.step)

    tracker = None
    if info.is_main:
        tracker = Tracker(cfg.experiment, cfg.run_name, state.run_id, cfg.system_metrics, cfg.system_metrics_interval)
        if state.run_id is None:
            tracker.log_params({**cfg.to_dict(), "parameters": n_params, "world_size": info.world,
                                "segments": len(dataset), "precision": "bf16" if bf16 else "fp32",
                                "attention_backend": backend, "model_preset": preset.name,
                                "execution": execution.name if execution else "as configured"})
        state.run_id = tracker.run_id

    batches = _loader(dataset, cfg, info, state.micro_steps)
    last = checkpointing.latest_checkpoint(output) if state.step >= cfg.steps else None
    bar = progress(total=cfg.steps, initial=state.step, desc="train", disable=not info.is_main, dynamic_ncols=True)
    deadline = TimeLimit(cfg.time_limit_min)
    try:
        while state.step < cfg.steps:
            start = time.perf_counter()
            terms = torch.zeros(3, device=info.device)
            tokens: float = 0
            grad_norm = None
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                x = draw_inputs(batch, dataset.empty_emb, teacher,
                                micro_step_generator(cfg.seed, info.rank, state.micro_steps, info.device))
                x = x.to(info.device, torch.bfloat16 if bf16 else torch.float32)
                out = engine(x)
                engine.backward(out[0])
                manual_norm = pre_step_grad_norm(engine)
                engine.step()
                grad_norm = manual_norm if manual_norm is not None else engine.get_global_grad_norm()
                terms += out.detach().float()
                tokens += x.tokens
                state.micro_steps += 1
            terms = all_mean(terms / cfg.grad_accum).cpu()  # waits for the step's kernels
            tokens = all_sum(tokens)
            elapsed = time.perf_counter() - start
            state.step += 1
            metrics = {"loss": float(terms[0]), "video_loss": float(terms[1]), "action_loss": float(terms[2]),
                       "lr": engine.get_lr()[0], "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
                       "samples": state.micro_steps * cfg.micro_batch * info.world}
            if grad_norm is not None and math.isfinite(float(grad_norm)):
                metrics["grad_norm"] = float(grad_norm)
            if info.cuda:  # this rank's, against the plan of fit_to_gpus
                metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"step {state.step}: loss is {metrics['loss']}")
            if tracker is not None:
                tracker.log_metrics(metrics, state.step)
            # refresh=False: the update draws it, as often as the bar's interval allows
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
            bar.update(1)
            out_of_time = deadline.reached()  # every rank's clock: agreed below, so all ranks save together
            if state.step % cfg.save_every == 0 or state.step == cfg.steps or out_of_time:
                if tracker is not None:
                    tracker.flush()
                last = checkpointing.save(engine, output, state, preset, base, cfg.keep_last, info,
                                           cfg.save_training_state)
                if tracker is not None and cfg.log_checkpoints == "all":
                    _log_checkpoint(tracker, last)
            if out_of_time:
                log.warning("time limit of %.1f min reached at step %d of %d; launch again to resume",
                            cfg.time_limit_min, state.step, cfg.steps)
                break
        bar.close()
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise

    outputs = None
    if info.is_main:
        if tracker is None or last is None:
            raise RuntimeError("the main rank ended its training without a tracker or a checkpoint")
        if cfg.log_checkpoints == "final":
            _log_checkpoint(tracker, last)
        report = write_report(output, tracker, cfg, preset, n_params, info.world)
        final = tracker.history("loss")
        outputs = TrainOutputs(str(last), tracker.run_id, state.step, final[-1][1] if final else math.nan,
                               str(report))
        write_text_atomically(output / OUTPUTS_FILE, json.dumps(asdict(outputs), indent=2) + "\n")
        tracker.log_artifacts(report.parent, "report")
        tracker.end()
    barrier()
    if outputs is None:
        outputs = read_outputs(output)
    return outputs


def _log_checkpoint(tracker: Tracker, folder: Path) -> None:
    """The servable part of a checkpoint (not the optimizer state) as the run's artifact."""
    for item in checkpointing.servable_items(folder):
        if item.is_dir():
            tracker.log_artifacts(item, f"{CHECKPOINT_ARTIFACT}/{item.name}")
        else:
            tracker.log_artifact(item, CHECKPOINT_ARTIFACT)
