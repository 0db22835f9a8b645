"""Evaluation metrics from episode records: per task and setting, per setting, latency."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from .results import EpisodeRecord


def async_mode(async_execution: bool | str) -> str:
    """An EvalConfig.async_execution value as a mode name: none, naive or grounded."""
    return "none" if not async_execution else "naive" if async_execution is True else str(async_execution)


def _latency(values: Sequence[float]) -> dict:
    if not values:
        return {"count": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"count": int(a.size), "mean_s": float(a.mean()), "p50_s": float(np.percentile(a, 50)),
            "p95_s": float(np.percentile(a, 95)), "max_s": float(a.max())}


def summarize(identity: dict, records: Sequence[EpisodeRecord]) -> dict:
    """metrics.json: rates are fractions in [0, 1]; a setting's rate is the mean of its tasks'
    rates, as the LingBot-VA paper averages RoboTwin tasks."""
    tasks: dict[str, dict[str, dict]] = {}
    for setting in identity["settings"]:
        for task in identity["tasks"]:
            rs = [r for r in records if r.setting == setting and r.task == task]
            if not rs:
                continue
            tasks.setdefault(task, {})[setting] = {
                "episodes": len(rs),
                "successes": sum(r.success for r in rs),
                "success_rate": float(np.mean([r.success for r in rs])),
                "mean_progress": float(np.mean([r.progress for r in rs])),
                "mean_steps": float(np.mean([r.steps for r in rs])),
                "errors": sum(r.status == "error" for r in rs),
            }
    settings = {}
    for setting in identity["settings"]:
        per_task = [t[setting] for t in tasks.values() if setting in t]
        if per_task:
            settings[setting] = {
                "tasks": len(per_task),
                "episodes": sum(t["episodes"] for t in per_task),
                "success_rate": float(np.mean([t["success_rate"] for t in per_task])),
                "mean_progress": float(np.mean([t["mean_progress"] for t in per_task])),
                "errors": sum(t["errors"] for t in per_task),
            }
    expected = len(identity["tasks"]) * len(identity["settings"]) * identity["episodes"]
    idle = [x for r in records for x in r.idle_s]
    execution = [x for r in records for x in r.execution_s]
    return {
        "suite": identity["suite"],
        "identity": identity,
        "episodes": len(records),
        "expected_episodes": expected,
        "complete": len(records) == expected,
        "success_rate": float(np.mean([s["success_rate"] for s in settings.values()])) if settings else 0.0,
        "errors": sum(r.status == "error" for r in records),
        "error_reasons": dict(Counter((r.error or "")[:300] for r in records if r.error).most_common(10)),
        "settings": settings,
        "tasks": tasks,
        "latency": {
            "chunk": _latency([x for r in records for x in r.chunk_latency_s]),
            "observe": _latency([x for r in records for x in r.observe_latency_s]),
            "idle": _latency(idle),
            "execution": _latency(execution),
        },
        "control_loop": {
            "async_execution": bool(identity.get("async_execution", False)),
            "async_mode": async_mode(identity.get("async_execution", False)),
            "real_time": bool(identity.get("real_time", False)),
            "operating_point": identity.get("operating_point") or "released",
            # the share of the loop (from the first chunk in hand to the end) the robot spends waiting
            "idle_fraction": sum(idle) / (sum(idle) + sum(execution)) if execution else None,
        },
    }


def flat_metrics(metrics: dict) -> dict[str, float]:
    """The numbers of metrics.json as MLflow metric names."""
    out = {"success_rate": metrics["success_rate"], "episodes": metrics["episodes"], "errors": metrics["errors"]}
    for setting, s in metrics["settings"].items():
        out[f"success_rate.{setting}"] = s["success_rate"]
        out[f"progress.{setting}"] = s["mean_progress"]
    for task, per in metrics["tasks"].items():
        for setting, t in per.items():
            out[f"success_rate.{setting}.{task}"] = t["success_rate"]
            out[f"progress.{setting}.{task}"] = t["mean_progress"]
    for kind, lat in metrics["latency"].items():
        for k, v in lat.items():
            if k != "count":
                out[f"latency.{kind}.{k}"] = v
    if metrics["control_loop"]["idle_fraction"] is not None:
        out["control_loop.idle_fraction"] = metrics["control_loop"]["idle_fraction"]
    return out
