"""`run(config)`: one shard of a closed-loop evaluation, and the report of a finished one.

```
<output_dir>/
  shards/shard-000-of-001/episodes.jsonl   one line per episode run (resumable), shard.json
  shards/shard-000-of-001/videos/<setting>/<task>/ep0000_seed10000_success.mp4
  episodes.jsonl metrics.json report.md report.html plots/   (after the last shard, or --merge)
```
A single-shard run finishes with the report and the MLflow run; with several shards each
writes its episodes and `merge_and_report` (`vaops eval --merge`) makes the report.

Resuming keeps the policy's verdicts (success, failure) and runs again the episodes that ended in
error: a server that was down, restarted or out of memory says nothing about the policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from vaops.components.stage_cli import progress

from .client import PolicyClient, PolicyConnectionError
from .config import EvalConfig, TrackingConfig, checked
from .episode import EpisodeEnv, run_episode
from .metrics import flat_metrics, summarize
from .report import write_report
from .results import (
    EPISODES_FILE,
    EpisodeLog,
    EpisodeRecord,
    WorkUnit,
    check_resumable,
    merge,
    shard_units,
    sort_records,
    work_units,
    write_json_atomic,
    write_manifest,
)
from .tracking import log_evaluation, model_run_tags
from .video import side_by_side, write_video

VIDEO_FPS = 8


class EvaluationAborted(RuntimeError):
    """The policy server could not be reached for several episodes in a row."""


@dataclass
class EvalResult:
    output_dir: Path
    records: list[EpisodeRecord]
    metrics: dict | None  # None for one shard of several: merge them for the metrics
    report: dict[str, Path] | None
    mlflow_run_id: str | None


def _episode(config: EvalConfig, client: PolicyClient, env: EpisodeEnv, setting: str, task: str,
             episode: int, seed: int, control_period_s: float = 0.0) -> tuple[EpisodeRecord, bool]:
    outcome = run_episode(client, env, seed=seed, imagine=config.imagine and config.videos,
                          record_frames=config.videos, async_execution=config.async_execution,
                          operating_point=config.operating_point,
                          control_period_s=control_period_s)
    video = None
    if config.videos and outcome.frames:
        path = (config.shard_dir() / "videos" / setting / task /
                f"ep{episode:04d}_seed{seed}_{outcome.status}.mp4")
        path = write_video(path, side_by_side(outcome.frames, caption=f"{task} #{episode}"), VIDEO_FPS)
        video = path.relative_to(config.output_dir).as_posix()
    record = EpisodeRecord(
        suite=config.suite, setting=setting, task=task, episode=episode, seed=seed, prompt=env.prompt,
        status=outcome.status, success=outcome.success, progress=outcome.progress, steps=outcome.steps,
        chunks=outcome.chunks, chunk_latency_s=outcome.chunk_latency_s,
        observe_latency_s=outcome.observe_latency_s, idle_s=outcome.idle_s, execution_s=outcome.execution_s,
        error=outcome.error, wall_s=outcome.wall_s, video=video)
    return record, outcome.connected


def _aloha_unit(config: EvalConfig, client: PolicyClient, unit: WorkUnit,
                done: dict) -> Iterator[tuple[EpisodeRecord, bool]]:
    from .aloha import AlohaEpisode, camera_size, episode_seed

    if not client.connected:  # the server's metadata names the camera size; an unreachable one fails per episode
        with contextlib.suppress(PolicyConnectionError):
            client.connect()
    size = camera_size(client.metadata)
    for e in unit.episodes:
        if (unit.setting, unit.task, e) in done:
            continue
        seed = episode_seed(config.seed, e)
        if config.max_steps is None:
            raise ValueError("suite 'aloha' needs max_steps (the sim has no step limit of its own)")
        env = AlohaEpisode(unit.task, seed, config.max_steps, config.fps, size)
        yield _episode(config, client, env, unit.setting, unit.task, e, seed,
                       env.control_period_s if config.real_time else 0.0)


def _robotwin_unit(checkout, config: EvalConfig, client: PolicyClient, unit: WorkUnit,
                   done: dict, retry: dict) -> Iterator[tuple[EpisodeRecord, bool]]:
    from .robotwin import trials

    def of_unit(records: dict) -> list[EpisodeRecord]:
        return sorted((r for r in records.values() if (r.setting, r.task) == (unit.setting, unit.task)),
                      key=lambda r: r.episode)

    # A trial that ended in error runs again on its own seed (the expert solved it: the walk from
    # there yields it first); the walk then goes on after every trial so far, errors included.
    for r in of_unit(retry):
        for trial in trials(checkout, unit.task, unit.setting, r.episode + 1, config.seed, config.max_steps,
                            (r.episode, r.seed)):
            yield _episode(config, client, trial.episode, unit.setting, unit.task, trial.index, trial.seed)
    prior = of_unit(retry | done)
    resume = (len(prior), prior[-1].seed + 1) if prior else None
    for trial in trials(checkout, unit.task, unit.setting, config.episodes, config.seed, config.max_steps, resume):
        yield _episode(config, client, trial.episode, unit.setting, unit.task, trial.index, trial.seed)


def _libero_unit(config: EvalConfig, client: PolicyClient, unit: WorkUnit,
                 done: dict) -> Iterator[tuple[EpisodeRecord, bool]]:
    from .libero import LiberoEpisode, episode_plan, episode_seed, load_task

    task = None
    for e in unit.episodes:
        if (unit.setting, unit.task, e) in done:
            continue
        task = task or load_task(unit.setting, unit.task)
        limit = {} if config.max_steps is None else {"max_steps": config.max_steps}  # None: LIBERO's own
        env = LiberoEpisode(task, episode_plan(e)[0], **limit)  # a new env per episode, as upstream
        try:
            yield _episode(config, client, env, unit.setting, unit.task, e, episode_seed(config.seed, e))
        finally:
            env.close()


def _units(config: EvalConfig, client: PolicyClient, units: list[WorkUnit], done: dict, retry: dict):
    if config.suite == "libero":
        for unit in units:
            yield from _libero_unit(config, client, unit, done)
        return
    if config.suite == "aloha":
        for unit in units:  # an episode not in `done` runs, whether new or one that ended in error
            yield from _aloha_unit(config, client, unit, done)
        return
    from .robotwin import RoboTwinCheckout

    root = checked(config).robotwin_root
    assert root is not None  # checked() refuses a robotwin run without one
    with RoboTwinCheckout(root) as checkout:
        for unit in units:
            yield from _robotwin_unit(checkout, config, client, unit, done, retry)


def run(config: EvalConfig) -> EvalResult:
    """Run this config's shard (resuming what it already did); report when it is the only shard.
    Raises PolicyError before any episode when the policy server cannot be reached."""
    if config.tracking.enabled:
        model_run_tags(config.tracking)
    check_resumable(config)
    log = EpisodeLog(config.shard_dir() / EPISODES_FILE)
    earlier = {r.key: r for r in log.read()}
    done = {k: r for k, r in earlier.items() if r.status != "error"}
    retry = {k: r for k, r in earlier.items() if r.status == "error"}
    units = shard_units(work_units(config), config.shard)
    total = sum(len(u.episodes) for u in units)
    finished = sum((u.setting, u.task, e) in done for u in units for e in u.episodes)
    with PolicyClient(config.client) as client:
        if finished < total:
            # Once, before any episode: a wrong --policy-url or a server not up yet is one error
            # naming the url, not a run of failed episodes.
            client.connect()
        write_manifest(config, complete=False, episodes=len(done))
        _run_episodes(config, client, units, log, done, retry, total, finished)
    write_manifest(config, complete=True, episodes=len(done))
    if config.shard.count == 1:
        return merge_and_report(config.output_dir, config.tracking)
    return EvalResult(config.output_dir, sort_records(done.values()), None, None, None)


def _run_episodes(config: EvalConfig, client: PolicyClient, units: list[WorkUnit], log: EpisodeLog, done: dict,
                  retry: dict, total: int, finished: int) -> None:
    """Run the shard's episodes not in `done`, appending each to the log and adding it to `done`."""
    successes = sum(r.success for r in done.values())
    unreachable = 0
    desc = f"eval {config.suite}" + (f" shard {config.shard}" if config.shard.count > 1 else "")
    with progress(total=total, initial=finished, desc=desc, unit="ep") as bar:
        for record, connected in _units(config, client, units, done, retry):
            log.append(record)
            done[record.key] = record
            successes += record.success
            bar.set_postfix(success=f"{successes}/{len(done)}", last=record.status, refresh=False)
            bar.update(1)
            unreachable = 0 if connected else unreachable + 1
            if unreachable >= config.max_consecutive_connection_failures:
                write_manifest(config, complete=False, episodes=len(done))
                raise EvaluationAborted(
                    f"stopped after {unreachable} episodes in a row could not reach the policy server "
                    f"({record.error}); {len(done)} episode(s) are saved in {log.path}, re-run to resume")


def merge_and_report(output_dir: Path, tracking: TrackingConfig) -> EvalResult:
    """Merge every shard's episodes, write metrics.json and the report, log them to MLflow."""
    output_dir = Path(output_dir)
    identity, records = merge(output_dir)
    metrics = summarize(identity, records)
    write_json_atomic(output_dir / "metrics.json", metrics)
    merged = output_dir / EPISODES_FILE
    tmp = merged.with_name(f".{merged.name}.tmp")
    tmp.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))
    tmp.replace(merged)
    title = f"Closed-loop evaluation: {identity['suite']}"
    report = write_report(output_dir, metrics, records, title)
    run_id = None
    if tracking.enabled:
        artifacts = [output_dir / "metrics.json", merged, report["markdown"], report["html"], output_dir / "plots"]
        artifacts += sorted((output_dir / "shards").glob("*/videos"))
        params = {k: v for k, v in identity.items() if k != "tasks"} | {"tasks": len(identity["tasks"])}
        run_id = log_evaluation(tracking, output_dir, flat_metrics(metrics), params, artifacts)
    return EvalResult(output_dir, records, metrics, report, run_id)
