"""Scripted-expert demonstrations from the MuJoCo ALOHA sim, written as a LeRobot dataset.

For each seed: plan the end-effector waypoints, turn them into joint targets in the mocap
scene, replay those in the joint-space scene while recording the top camera, joint
positions and actions at `fps`, and keep the episode if the task succeeded.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vaops.components.dataset import ENCODER_LOG, Episode, EpisodeMeta, Segment, write_dataset

from . import sim
from .config import CAMERA, DemosConfig


@dataclass
class DemosResult:
    output: Path
    episodes: int
    attempts: int
    success_rate: float
    seeds: list[int]


def features(cfg: DemosConfig) -> dict:
    names = sim.STATE_NAMES
    return {
        CAMERA.key: {"dtype": "video", "shape": (cfg.image_height, cfg.image_width, 3),
                     "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (len(names),), "names": names},
        "action": {"dtype": "float32", "shape": (len(names),), "names": names},
    }


def segments(task: sim.SimTask, num_frames: int, hold: int, time_scale: float) -> list[Segment]:
    """The task's phases in recorded frames (plan steps -> control steps -> frames)."""
    starts = [min(num_frames, int(round(step * time_scale / hold))) for step, _ in task.segments]
    ends = starts[1:] + [num_frames]
    return [Segment(s, e, text) for s, e, (_, text) in zip(starts, ends, task.segments) if e > s]


def check_config(cfg: DemosConfig) -> int:
    """Validates the config and returns the number of control steps each recorded frame holds."""
    if not cfg.tasks:
        raise ValueError("task: name at least one sim task")
    for task in cfg.tasks:
        sim.get_task(task)
    if cfg.fps <= 0 or sim.CONTROL_HZ % cfg.fps:
        raise ValueError(f"fps={cfg.fps}: must divide the sim's control rate of {sim.CONTROL_HZ} Hz")
    if cfg.episodes < 1:
        raise ValueError(f"episodes={cfg.episodes}: need at least one episode")
    if not math.isfinite(cfg.time_scale) or cfg.time_scale <= 0:
        raise ValueError(f"time_scale={cfg.time_scale}: must be a positive number")
    return sim.CONTROL_HZ // cfg.fps


def rollout(cfg: DemosConfig, seed: int, render: bool = True, task: str | None = None) -> sim.Rollout:
    hold = check_config(cfg)
    task = task or cfg.tasks[0]
    poses = sim.object_poses(task, seed)
    joints = sim.plan_joint_trajectory(task, poses, cfg.time_scale)
    size = (cfg.image_height, cfg.image_width) if render else None
    return sim.replay(task, poses, joints, hold, size)


def _one_thread() -> None:
    # Each worker resizes frames with torch: at its default of one thread per core, 14 workers on
    # 16 cores ran 6x slower than one worker alone (measured on a GPU node).
    torch.set_num_threads(1)


def _rollouts(cfg: DemosConfig, task: str, seeds: range) -> Generator[tuple[int, sim.Rollout], None, None]:
    """`(seed, rollout)` in seed order; with several workers, computed ahead in child processes
    (spawned: each makes its own EGL context, which a forked child cannot share)."""
    if cfg.workers == 1:
        yield from ((s, rollout(cfg, s, task=task)) for s in seeds)
        return
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        ahead = 2 * cfg.workers
        pending: deque = deque()
        it = iter(seeds)
        try:
            for s in itertools.islice(it, ahead):
                pending.append((s, pool.submit(rollout, cfg, s, True, task)))
            while pending:
                s, future = pending.popleft()
                yield s, future.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(rollout, cfg, nxt, True, task)))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _record_task(cfg: DemosConfig, task_name: str, hold: int, first_index: int, seeds: list[int],
                 counts: dict[str, int], bar: tqdm) -> Iterator[Episode]:
    """`cfg.episodes` successful episodes of one task, as the rollouts finish; counts its attempts
    and successes into `counts`."""
    task = sim.get_task(task_name)
    attempts = successes = recorded = 0
    rollouts = _rollouts(cfg, task_name, range(cfg.first_seed, cfg.first_seed + cfg.max_attempts))
    try:
        for seed, r in rollouts:
            if recorded == cfg.episodes:
                break
            attempts += 1
            successes += r.success
            bar.set_postfix(task=task_name.split("-")[0], success=f"{successes}/{attempts}")
            if not (r.success or cfg.keep_failed):
                continue
            n = len(r.actions)
            config = (segments(task, n, hold, cfg.time_scale) if cfg.segments == "phases"
                      else [Segment(0, n, task.task_text)])
            meta = EpisodeMeta(episode_index=first_index + recorded, length=n, tasks=[task.task_text],
                               action_config=config, success=r.success, seed=seed)
            seeds.append(seed)
            recorded += 1
            bar.update(1)
            yield Episode(meta, {"observation.state": r.states, "action": r.actions},
                          {CAMERA.key: r.images}, [task.task_text] * n)
    finally:
        rollouts.close()  # stops the workers' look-ahead
        counts["attempts"] += attempts
        counts["successes"] += successes
    if recorded < cfg.episodes:
        raise RuntimeError(f"{task_name}: only {recorded} of {cfg.episodes} episodes succeeded "
                           f"in {attempts} seeds from {cfg.first_seed}; raise max_attempts")


def run(cfg: DemosConfig) -> DemosResult:
    """Rollouts stream into the writer: with `workers` > 1, as many processes write the episodes
    (in shards) while the rollout processes go on, so neither waits for the other."""
    hold = check_config(cfg)
    seeds: list[int] = []
    counts = {"attempts": 0, "successes": 0}
    total = cfg.episodes * len(cfg.tasks)
    with tqdm(total=total, desc="scripted demos", unit="ep") as bar:
        def recorded() -> Iterator[Episode]:
            for i, task_name in enumerate(cfg.tasks):
                yield from _record_task(cfg, task_name, hold, i * cfg.episodes, seeds, counts, bar)

        out = write_dataset(cfg.output, recorded(), fps=cfg.fps, features=features(cfg), robot_type="aloha",
                            vcodec=cfg.vcodec, total=total, desc="write demos", workers=cfg.workers,
                            log_path=encoder_log(cfg))
    return DemosResult(Path(out), total, counts["attempts"], counts["successes"] / counts["attempts"], seeds)


def encoder_log(cfg: DemosConfig) -> Path:
    """The video encoder's log lines go beside the dataset (`data/demos.encoder.log`), not to the console."""
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f"{out.name}.{ENCODER_LOG}")


def success_rate(cfg: DemosConfig, seeds: list[int]) -> float:
    """Fraction of seeds the scripted expert solves (no rendering)."""
    return float(np.mean([rollout(cfg, s, render=False).success for s in seeds]))
