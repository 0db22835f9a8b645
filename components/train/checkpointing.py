"""Training checkpoints: a servable checkpoint folder plus the state to resume from.

```
<output>/checkpoints/step-00001000/
    transformer/          released layout (config.json + diffusion_pytorch_model.safetensors)
    vae/ text_encoder/ tokenizer/   from the base checkpoint (hard links), when it has them
    policy.json           preset, cameras, channel map, the dataset's norm statistics, sampling
    training/             DeepSpeed engine state (weights, optimizer per ZeRO rank, LR schedule) and
                          DeepSpeed's zero_to_fp32.py
    trainer_state.json    step, micro-steps (the data position), MLflow run id, config
```
A checkpoint is written into a hidden temporary folder and renamed into place (every rank writes
its ZeRO shards there), so a folder named `step-*` is always complete; only the last `keep_last` are kept. Every random draw of a step is
seeded by (seed, rank, micro-step), so the step counter restores the random state too.

`run_folder` names a run folder after what the run trains (its data, its base checkpoint, its
configuration and world size), so that a launcher whose own output folder changes every time (a
pipeline step) finds the checkpoints of its interrupted predecessor, and only of that one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from vaops.models.atomic import link_or_copy, write_folder_atomically, write_text_atomically
from vaops.models.checkpoint import POLICY_FILE, policy_dict
from vaops.models.model_source import WEIGHT_PARTS
from vaops.models.config import Preset, TransformerConfig
from vaops.models.transformer import LingBotVATransformer, save_transformer

from .distributed import DistInfo, barrier, broadcast_object, full_state_dict

CHECKPOINTS = "checkpoints"
ENGINE_STATE = "training"
ENGINE_TAG = "state"
STATE_FILE = "trainer_state.json"
BASE_PARTS = WEIGHT_PARTS[1:]  # vae, text_encoder, tokenizer: what a checkpoint takes from its base
MODULE_PREFIX = "transformer."  # the trained module wraps the transformer under this name
# Changing these between a run and its resumption would break the continued curve or be silently
# ignored (the optimizer and LR schedule come back from the checkpoint).
RESUME_FIELDS = ("preset", "init_from", "micro_batch", "grad_accum", "seed", "zero_stage", "chunk_range",
                 "window_range", "max_latent_frames", "text_dropout", "noisy_history", "hold_first_frame",
                 "video_shift", "action_shift", "lr", "betas", "weight_decay", "warmup_steps", "lr_schedule",
                 "norm_stats", "forward_dynamics_prob")
# TrainConfig fields that change how a run is executed or recorded, not what it trains: configurations
# that differ only in these share a run folder (`run_folder`), so one resumes the other. Recomputing
# more or fewer blocks (checkpoint_every) gives the same numbers.
EXECUTION_FIELDS = ("output", "num_workers", "preload", "time_limit_min", "save_every", "keep_last",
                    "system_metrics", "system_metrics_interval", "checkpoint_every", "fit_execution", "gpu_memory_gib")
RUN_KEY_FILE = "run_key.json"  # in a run folder: what its name is a hash of
METADATA_SUFFIXES = (".json", ".jsonl", ".yaml", ".txt")  # small files whose content an input identity includes


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    micro_steps: int = 0  # micro-batches done on each rank: the data position
    world: int = 1
    run_id: str | None = None
    config: dict = dataclasses.field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> TrainerState:
        try:
            raw = json.loads(path.read_text())
            return cls(**raw)
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}: unreadable trainer state ({e})") from None


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(output: Path) -> list[Path]:
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output: Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def remove_partial(output: Path) -> None:
    """Temporary folders of saves that a kill interrupted."""
    root = output / CHECKPOINTS
    if root.is_dir():
        for p in [*root.glob(".step-*.tmp-*"), *root.glob(".step-*.old-*")]:
            shutil.rmtree(p, ignore_errors=True)


def check_resumable(state: TrainerState, config: dict, world: int, source: Path) -> None:
    # A cosine schedule is shaped by the run's length: more steps on resume would jump the LR back up.
    fields = RESUME_FIELDS + (("steps",) if config.get("lr_schedule") == "cosine" else ())
    changed = [f"{k}: {state.config.get(k)!r} -> {config.get(k)!r}" for k in fields
               if k in state.config and state.config[k] != config.get(k)]
    if state.world != world:
        changed.append(f"world size: {state.world} -> {world}")
    if changed:
        raise ValueError(f"{source}: cannot resume, the run changed: " + "; ".join(changed)
                         + " (use a new output folder for a new run)")



def folder_identity(folder: Path) -> dict:
    """An input folder's identity without reading its bulk: its path (a pipeline artifact's path is
    unique to the run that made it, as its cache key assumes), every file's name and size, and the
    content of its metadata files (JSON, JSONL, YAML, text)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    listing = hashlib.sha256()
    count = 0
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(parent) / name
            listing.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
            if name.endswith(METADATA_SUFFIXES):
                listing.update(hashlib.sha256(path.read_bytes()).digest())
            count += 1
    return {"path": str(folder.absolute()), "files": count, "sha256": listing.hexdigest()}


def run_identity(cfg: dict, world: int) -> dict:
    """What a run trains: its dataset and base checkpoint (`folder_identity`), every config field
    but the EXECUTION_FIELDS, and the world size (a resumed run keeps its ZeRO partitioning)."""
    return {"dataset": folder_identity(Path(cfg["dataset"])),
            "init_from": folder_identity(Path(cfg["init_from"])) if cfg.get("init_from") else None,
            "world": world,
            "config": {k: v for k, v in sorted(cfg.items()) if k not in (*EXECUTION_FIELDS, "dataset", "init_from")}}


def run_folder(root: Path, cfg: dict, world: int) -> Path:
    """The run folder under `root` for this run (`<preset>-<16 hex digits of run_identity's hash>`),
    made if new, with the identity beside the checkpoints (run_key.json). The same data, base and
    config find the same folder again; any other run gets another."""
    identity = run_identity(cfg, world)
    text = json.dumps(identity, indent=2, sort_keys=True) + "\n"
    folder = Path(root) / f"{cfg.get('preset', 'run')}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / RUN_KEY_FILE).is_file():
        write_text_atomically(folder / RUN_KEY_FILE, text)
    return folder


def write_transformer(weights: dict[str, torch.Tensor], config: TransformerConfig, folder: Path) -> None:
    state = {k[len(MODULE_PREFIX):]: v for k, v in weights.items() if k.startswith(MODULE_PREFIX)}
    with torch.device("meta"):
        model = LingBotVATransformer(config)
    model.load_state_dict(state, assign=True)
    save_transformer(model, folder)


def save(engine, output: Path, state: TrainerState, preset: Preset, base: Path | None, keep_last: int,
         info: DistInfo, training_state: bool = True) -> Path:
    """Write checkpoint `state.step` (all ranks call this); returns its folder. Without
    `training_state` only the weights: the checkpoint serves but cannot be resumed."""
    final = checkpoint_dir(output, state.step)

    def write_shared(tmp: Path | None):
        # Rank 0 made the temporary folder; every rank writes its ZeRO shards into it.
        shared = [str(tmp) if tmp is not None else None]
        broadcast_object(shared)
        if shared[0] is None:
            raise RuntimeError("rank 0 sent no checkpoint folder")
        tmp = Path(shared[0])
        if training_state:
            engine.save_checkpoint(str(tmp / ENGINE_STATE), tag=ENGINE_TAG, save_latest=False)
        weights = full_state_dict(engine)
        barrier()
        return weights

    def write(tmp: Path) -> None:
        write_transformer(write_shared(tmp), preset.transformer, tmp / "transformer")
        (tmp / POLICY_FILE).write_text(json.dumps(policy_dict(preset), indent=2) + "\n")
        for part in BASE_PARTS:
            if base is not None and (base / part).is_dir():
                shutil.copytree(base / part, tmp / part, copy_function=link_or_copy)
        state.write(tmp / STATE_FILE)

    if info.is_main:
        write_folder_atomically(final, write)
        for stale in list_checkpoints(output)[:-keep_last]:
            shutil.rmtree(stale)
    else:
        write_shared(None)
    barrier()
    return final


def servable_items(folder: Path) -> list[Path]:
    """What a served checkpoint needs: everything but the training state."""
    return [p for p in sorted(folder.iterdir()) if p.name not in (ENGINE_STATE, STATE_FILE)]


def load(engine, folder: Path, config: dict, world: int) -> TrainerState:
    """Restore the engine (weights, optimizer, LR schedule) and the trainer state from `folder`,
    after checking that the run's configuration allows continuing its curve."""
    state = TrainerState.read(folder / STATE_FILE)
    check_resumable(state, config, world, folder)
    if not (folder / ENGINE_STATE).is_dir():
        raise ValueError(f"{folder}: saved without its training state (save_training_state false), so it cannot "
                         f"be resumed; use a new output folder")
    path, _ = engine.load_checkpoint(str(folder / ENGINE_STATE), tag=ENGINE_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"{folder / ENGINE_STATE}: DeepSpeed could not load the training state")
    state.config = config
    return state
