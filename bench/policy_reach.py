"""Where a trained `small` ALOHA policy departs from the scripted expert, on the expert's own seeds.

Two measurements, one checkpoint, CPU is enough (one chunk takes seconds):

- **reach**: the first chunk, predicted from the first camera frame alone (the arm's reach towards
  the object it sees), against the expert's first 16 actions: per-joint error and, across seeds,
  how well the predicted end-of-reach joint angles follow the expert's (correlation, spread).
- **teacher-forced**: the first chunk's real frames and the expert's actions observed, the next
  chunk's 32 actions against the expert's. Small here and large in the reach means the loop
  (observe, KV cache, normalisation, action mapping) is sound and the image-to-reach mapping is not.

    python bench/policy_reach.py CHECKPOINT --seeds 0-7 10000-10007 --out bench/results/policy_reach
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RIGHT_ARM = {"waist": 7, "shoulder": 8, "elbow": 9, "wrist angle": 11}
CAMERA = "observation.images.top"


def seed_range(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def measure(checkpoint: Path, task: str, seeds: list[int]) -> dict:
    from vaops.components.demos import sim
    from vaops.components.demos.config import PRESETS, for_model_preset
    from vaops.components.demos.stage import rollout
    from vaops.models.checkpoint import load_policy

    policy = load_policy(checkpoint, "cpu")
    cfg = for_model_preset(PRESETS["small"], "small")
    n = policy.preset.action_per_frame
    reach_err, forced_err, demo_end, pred_end = [], [], [], []
    for seed in seeds:
        r = rollout(cfg, seed, task=task)
        assert r.images is not None  # the demos config renders the top camera
        policy.reset(sim.TASKS[task].task_text, seed=0)
        first = policy.act({CAMERA: r.images[0]})
        reach = first.actions[:, 1].T  # latent frame 1: the first n actions (frame 0 is the image)
        reach_err.append(np.abs(reach - r.actions[:n]).mean(0))
        demo_end.append(r.actions[n - 1])
        pred_end.append(reach[-1])
        executed = np.stack([first.actions[:, 0], r.actions[:n].T], axis=1)
        keyframes = [{CAMERA: r.images[i]} for i in range(4, n + 1, 4)]
        policy.observe(keyframes, executed)
        nxt = policy.act().actions.reshape(len(policy.channels), -1).T
        m = min(len(nxt), len(r.actions) - n)
        forced_err.append(np.abs(nxt[:m] - r.actions[n:n + m]).mean(0))
    demo_end, pred_end = np.array(demo_end), np.array(pred_end)
    follow = {}
    for name, j in RIGHT_ARM.items():
        d, p = demo_end[:, j], pred_end[:, j]
        follow[name] = {"expert_std_rad": round(float(d.std()), 3), "policy_std_rad": round(float(p.std()), 3),
                        "correlation": round(float(np.corrcoef(d, p)[0, 1]), 2),
                        "mean_abs_err_rad": round(float(np.abs(p - d).mean()), 3)}
    arm = list(RIGHT_ARM.values())
    return {"seeds": seeds, "reach_err_rad_right_arm": round(float(np.mean(reach_err, axis=0)[arm].mean()), 3),
            "teacher_forced_err_rad_all": round(float(np.mean(forced_err)), 3),
            "teacher_forced_err_rad_right_arm": round(float(np.mean(forced_err, axis=0)[arm].mean()), 3),
            "end_of_reach_follow": follow}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--task", default="AlohaTransferCube-v0")
    p.add_argument("--seeds", nargs="+", default=["0-7", "10000-10007"], help="ranges such as 0-7 (one group each)")
    p.add_argument("--out", type=Path, default=Path("bench/results/policy_reach"))
    a = p.parse_args()
    groups = {g: measure(a.checkpoint, a.task, seed_range(g)) for g in a.seeds}
    result = {"checkpoint": str(a.checkpoint), "task": a.task, "groups": groups}
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Reach against the scripted expert ({a.task})", "", f"Checkpoint `{a.checkpoint}`; "
             "made by `bench/policy_reach.py` (see its docstring for what each number is).", "",
             "| seeds | reach error, right arm (rad) | next chunk teacher-forced, right arm (rad) | "
             "end-of-reach correlation waist / shoulder / elbow / wrist | spread policy / expert, waist (rad) |",
             "| --- | --- | --- | --- | --- |"]
    for g, r in groups.items():
        f = r["end_of_reach_follow"]
        corr = " / ".join(f"{f[k]['correlation']:.2f}" for k in RIGHT_ARM)
        lines.append(f"| {g} | {r['reach_err_rad_right_arm']:.3f} | {r['teacher_forced_err_rad_right_arm']:.3f} | "
                     f"{corr} | {f['waist']['policy_std_rad']:.3f} / {f['waist']['expert_std_rad']:.3f} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
