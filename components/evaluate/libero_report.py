"""LIBERO results in the paper's form: one row per suite (Spatial, Object, Goal, Long) with the
success rate, its 95 % Wilson interval, the spread over seed rounds and the paper's number beside;
then one row per task with its instruction."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from vaops.components.reports import markdown_table

from .libero import INIT_STATES, PAPER, PAPER_AVERAGE, SUITE_LABELS, episode_plan
from .results import EpisodeRecord

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a success rate (fractions); (0, 1) for no episodes."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def seed_round_rates(records: Sequence[EpisodeRecord], suite: str) -> list[float]:
    """The suite's success rate in each seed round (episodes `r*50 .. r*50+49` of every task)."""
    rounds: dict[int, list[bool]] = {}
    for r in records:
        if r.setting == suite:
            rounds.setdefault(episode_plan(r.episode)[1], []).append(r.success)
    return [float(np.mean(v)) for _, v in sorted(rounds.items())]


def suite_rows(metrics: dict, records: Sequence[EpisodeRecord]) -> list[dict]:
    rows = []
    for suite, s in metrics["settings"].items():
        mine = [r for r in records if r.setting == suite]
        k, n = sum(r.success for r in mine), len(mine)
        rounds = seed_round_rates(records, suite)
        rows.append({"suite": suite, "label": SUITE_LABELS.get(suite, suite), "episodes": n, "successes": k,
                     "tasks": s["tasks"], "success_rate": s["success_rate"], "interval": wilson_interval(k, n),
                     "seed_rounds": len(rounds), "seed_std": float(np.std(rounds)) if len(rounds) > 1 else None,
                     "paper": PAPER.get(suite)})
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def suite_table(metrics: dict, records: Sequence[EpisodeRecord]) -> str:
    rows = []
    for row in suite_rows(metrics, records):
        lo, hi = row["interval"]
        spread = f"± {_pct(row['seed_std'])} ({row['seed_rounds']} seeds)" if row["seed_std"] is not None else "–"
        paper = f"{row['paper'][0]:.1f} ± {row['paper'][1]:.1f}" if row["paper"] else "–"
        rows.append([f"{row['label']} ({row['suite']})", row["episodes"], f"**{_pct(row['success_rate'])}**",
                     f"{_pct(lo)}–{_pct(hi)}", spread, paper])
    if len(metrics["settings"]) > 1:
        rows.append([f"**Average ({len(metrics['settings'])} suites)**", sum(r[1] for r in rows),
                     f"**{_pct(metrics['success_rate'])}**", "", "", f"{PAPER_AVERAGE:.1f}"])
    return markdown_table(["Suite", "Episodes", "Success (%)", "95% interval (%)", "Spread over seeds",
                           "LingBot-VA, paper (%)"], rows)


def task_table(metrics: dict, records: Sequence[EpisodeRecord]) -> str:
    prompts = {(r.setting, r.task): r.prompt for r in records}
    rows = []
    for suite in metrics["settings"]:
        for task, per in metrics["tasks"].items():
            if suite not in per:
                continue
            t = per[suite]
            lo, hi = wilson_interval(t["successes"], t["episodes"])
            rows.append([SUITE_LABELS.get(suite, suite), task, prompts.get((suite, task), ""), t["episodes"],
                         _pct(t["success_rate"]), f"{_pct(lo)}–{_pct(hi)}", f"{t['mean_steps']:.0f}", t["errors"]])
    return markdown_table(["Suite", "Task", "Instruction", "Episodes", "Success (%)", "95% interval (%)",
                           "Mean length (env steps)", "Errors"], rows)


def libero_tables(metrics: dict, records: Sequence[EpisodeRecord]) -> str:
    note = (f"Episode `i` of a task starts from the official init state `i % {INIT_STATES}` in seed round "
            f"`i // {INIT_STATES}`; the paper reports 3 seeds x 500 trials per suite.")
    return "\n".join([suite_table(metrics, records), "", note, "", "### Per task", "",
                      task_table(metrics, records)])
