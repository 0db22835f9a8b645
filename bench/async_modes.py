"""Closed-loop success and task time of synchronous, naive asynchronous and grounded asynchronous
execution on the same seeds, through one live `vaops serve` of a trained policy.

Each seed runs once per mode before the next seed starts (sync, naive, grounded), so when the time
budget ends the modes have the same seeds. Episodes are the evaluation's own (`run_episode`, the
ALOHA sim, the websocket protocol), paced in real time by default: every action takes 1/fps s of
wall time, so the server's work competes with the robot's clock as on a robot and the wall time of
an episode is the task's. The sampling seed of an episode is its env seed in every mode.

    MUJOCO_GL=egl nice .venv/bin/python bench/async_modes.py --budget-s 1500 \\
        --out bench/results/async_modes_cpu      # writes .json and .md

`--forecast-error N` instead measures, in-process on N seeds, what grounding is for: how far the
executing chunk's cached video is from what the cameras then saw (its encoded keyframes), for the
stale forecast (naive) against the re-imagined video (grounded), the robot executing the grounded
chunks for a fixed number of chunks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES: dict[str, bool | str] = {"sync": False, "naive": True, "grounded": "grounded"}  # -> the reset's async_execution
# --precisions: one server per precision, each seed run in every (mode, precision) before the next
PRECISIONS: dict[str, list[str]] = {"float32": [], "bfloat16": ["--dtype", "bfloat16"],
                                    "fp8": ["--dtype", "bfloat16", "--fp8"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "small-aloha"))
    parser.add_argument("--task", default="AlohaTransferCube-v0")
    parser.add_argument("--first-seed", type=int, default=10000, help="held-out seeds, as `make demo` uses")
    parser.add_argument("--max-seeds", type=int, default=50)
    parser.add_argument("--budget-s", type=float, default=1500.0, help="no new seed starts after this")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--no-real-time", action="store_true", help="execute as fast as the sim steps")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--precisions", nargs="+", default=["float32"], choices=list(PRECISIONS),
                        help="the servers' weights (fp8: bf16 weights, FP8 block products; on a CPU oneDNN's); "
                             "with more than one, a variant is 'MODE PRECISION'")
    parser.add_argument("--operating-point", help="the server's named sampling settings (released, paper, fast); "
                        "default: the model's own")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="the server's (1: a busy 2-core machine's OpenMP barriers make 2 threads slower)")
    parser.add_argument("--observe-in-reply", action="store_true",
                        help="the server computes each observation before its reply (vaops serve "
                        "--no-defer-observations), as before stop 37")
    parser.add_argument("--out", type=Path, help="writes OUT.json and OUT.md")
    parser.add_argument("--forecast-error", type=int, metavar="N", help="measure the cached video's error on N seeds")
    parser.add_argument("--chunks", type=int, default=5, help="with --forecast-error: chunks per episode")
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.forecast_error:
        return forecast_error(args)

    from vaops.components.evaluate.aloha import AlohaEpisode, camera_size
    from vaops.components.evaluate.client import PolicyClient
    from vaops.components.evaluate.config import ClientConfig
    from vaops.components.evaluate.episode import run_episode
    from vaops.components.evaluate.local_server import LocalPolicyServer

    base = args.out if args.out else Path("/tmp/async_modes")
    if args.out:
        args.out.with_suffix(".episodes.jsonl").unlink(missing_ok=True)
    variants = [(m if len(args.precisions) == 1 else f"{m} {p}", m, p) for p in args.precisions for m in args.modes]
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        clients = {}
        for p in args.precisions:
            log = base.with_suffix(".server.log" if len(args.precisions) == 1 else f".{p}.server.log")
            serve_args = PRECISIONS[p] + (["--no-defer-observations"] if args.observe_in_reply else [])
            server = stack.enter_context(LocalPolicyServer(args.checkpoint, log, torch_threads=args.torch_threads,
                                                           serve_args=serve_args))
            clients[p] = stack.enter_context(PolicyClient(ClientConfig(url=server.url, request_timeout_s=600)))
            clients[p].connect()
        size = camera_size(clients[args.precisions[0]].metadata)
        server_ready_s = time.perf_counter() - started
        for seed in range(args.first_seed, args.first_seed + args.max_seeds):
            if time.perf_counter() - started > args.budget_s:
                break
            for label, mode, precision in variants:
                env = AlohaEpisode(args.task, seed, args.max_steps, args.fps, size)
                out = run_episode(clients[precision], env, seed=seed, async_execution=MODES[mode],
                                  operating_point=args.operating_point,
                                  control_period_s=0.0 if args.no_real_time else env.control_period_s)
                row = {"seed": seed, "mode": label, "precision": precision, "status": out.status,
                       "success": out.success,
                       "progress": out.progress, "steps": out.steps, "chunks": out.chunks, "wall_s": out.wall_s,
                       "idle_s": out.idle_s, "execution_s": out.execution_s, "chunk_latency_s": out.chunk_latency_s,
                       "observe_latency_s": out.observe_latency_s, "error": out.error}
                rows.append(row)
                if args.out:  # kept as it goes: a run cut short still has its episodes
                    with args.out.with_suffix(".episodes.jsonl").open("a") as f:
                        f.write(json.dumps(row) + "\n")
                print(f"seed {seed} {label:14} {out.status:7} steps {out.steps:3} chunks {out.chunks} "
                      f"wall {out.wall_s:6.1f} s", flush=True)
    labels = [label for label, _, _ in variants]
    result = {
        "what": "closed-loop success and task time per asynchronous-execution mode, same seeds",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),
        "command": " ".join(["nice", ".venv/bin/python", "bench/async_modes.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_before": load_before,
                    "load_avg_after": os.getloadavg(), "torch_threads": args.torch_threads},
        "checkpoint": str(Path(args.checkpoint).resolve().relative_to(ROOT)) if Path(args.checkpoint).resolve()
        .is_relative_to(ROOT) else args.checkpoint,
        "task": args.task, "max_steps": args.max_steps, "fps": args.fps, "real_time": not args.no_real_time,
        "operating_point": args.operating_point or "released",
        "server_ready_s": server_ready_s, "total_s": time.perf_counter() - started,
        "precisions": args.precisions,
        "modes": {m: summarize([r for r in rows if r["mode"] == m]) for m in labels},
        "episodes": rows,
    }
    complete = sorted({r["seed"] for r in rows if all(any(q["seed"] == r["seed"] and q["mode"] == m for q in rows)
                                                       for m in labels)})
    result["seeds"] = complete
    result["all_succeeded"] = both_succeeded(rows, labels, complete)
    result["paired"] = paired(rows, labels, complete)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


def forecast_error(args) -> int:
    """Per chunk computed ahead (from the second on): the mean squared error, in normalised latent space,
    of the stale forecast and of the re-imagined video against the chunk's encoded keyframes; and, as a
    scale, of the previous chunk's observation held still (a forecast that nothing moves)."""
    import numpy as np
    import torch

    from vaops.components.evaluate.aloha import AlohaEpisode
    from vaops.models.checkpoint import load_weights
    from vaops.models.model_source import resolve_checkpoint

    torch.set_num_threads(args.torch_threads)
    weights = load_weights(resolve_checkpoint(args.checkpoint))  # a shipped folder: its VAE and text encoder rebuilt
    policy = weights.new_policy()
    preset = policy.preset
    keys = [c.key for c in preset.cameras]
    observed: list[torch.Tensor] = []
    engine_observe = policy.engine.observe

    def capture(latents, actions):
        observed.append(latents.clone())
        return engine_observe(latents, actions)

    policy.engine.observe = capture
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.forecast_error):
        env = AlohaEpisode(args.task, seed, 10**6, args.fps, (preset.cameras[0].height, preset.cameras[0].width))
        policy.reset(env.prompt, seed=seed, operating_point=args.operating_point)
        observed.clear()
        obs = env.observation()
        chunk = policy.act({k: obs[k] for k in keys})
        interval = policy.keyframe_interval
        for k in range(args.chunks):
            # k >= 1: chunk k was computed ahead; first the variant that ignores its actions, on a copy
            # of the state and the same noise, then the grounded pass itself
            blind = reimagine_without_actions(policy) if k >= 1 else None
            ahead = policy.act_ahead(grounded=True)  # re-imagines chunk k when it was computed ahead (k >= 1)
            re_imagined = policy.engine.grounded
            grounded = re_imagined.video.clone() if k >= 1 and re_imagined is not None else None
            keyframes = []
            for f in range(1 if k == 0 else 0, preset.frame_chunk_size):
                for j in range(preset.action_per_frame):
                    env.step(chunk.actions[:, f, j])
                    if (j + 1) % interval == 0:
                        keyframes.append({key: env.observation()[key] for key in keys})
            policy.observe(keyframes, chunk.actions)
            if k >= 1:
                real = observed[-1]
                mse = lambda x: float(((x.float() - real.float()) ** 2).mean())  # noqa: E731
                still = observed[-2][:, :, -1:].expand_as(real)
                rows.append({"seed": seed, "chunk": k, "stale_mse": mse(chunk.latents), "grounded_mse": mse(grounded),
                             "without_actions_mse": mse(blind), "still_mse": mse(still),
                             "success_so_far": env.success})
                print(f"seed {seed} chunk {k}: stale {rows[-1]['stale_mse']:.4f} grounded "
                      f"{rows[-1]['grounded_mse']:.4f} without actions {rows[-1]['without_actions_mse']:.4f} "
                      f"still {rows[-1]['still_mse']:.4f}", flush=True)
            chunk = ahead
    stale = np.array([r["stale_mse"] for r in rows])
    grounded = np.array([r["grounded_mse"] for r in rows])
    summary = {"chunks": len(rows), "stale_mse_mean": float(stale.mean()), "grounded_mse_mean": float(grounded.mean()),
               "without_actions_mse_mean": float(np.mean([r["without_actions_mse"] for r in rows])),
               "still_mse_mean": float(np.mean([r["still_mse"] for r in rows])),
               "grounded_better": int((grounded < stale).sum()),
               "ratio_mean": float((grounded / stale).mean())}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"what": "cached video of the executing chunk against its observation (normalised latents, MSE)",
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "command": " ".join(["nice", ".venv/bin/python", "bench/async_modes.py", *sys.argv[1:]]),
             "task": args.task, "operating_point": args.operating_point or "released", "summary": summary,
             "rows": rows}, indent=1) + "\n")
    return 0


def reimagine_without_actions(policy):
    """The executing chunk's video re-denoised from the observed history alone (its actions not in the
    cache), with the noise the grounded pass will draw; the engine's state is left as it was. For the
    measurement only: it tells what attending to the executing actions adds."""
    import torch

    engine, cache = policy.engine, policy.engine.cache
    saved = (cache.k.clone(), cache.v.clone(), cache.valid.clone(), cache.head, cache.tail, cache.predicted_from)
    rng = policy.generator.get_state() if policy.generator is not None else torch.get_rng_state()
    c = engine.config
    shape = (1, engine.model.config.in_channels, c.frame_chunk_size, c.latent_height, c.latent_width)
    with torch.no_grad():
        noise = engine._noise(None, shape, policy.generator, "ground_noise")
        cache.drop_predicted()
        video = engine._denoise("video", noise, engine.video_schedule, c.sampling.guidance_scale, None)[0].clone()
    cache.k.copy_(saved[0])
    cache.v.copy_(saved[1])
    cache.valid.copy_(saved[2])
    cache.head, cache.tail, cache.predicted_from = saved[3:]
    if policy.generator is not None:
        policy.generator.set_state(rng)
    else:
        torch.set_rng_state(rng)
    return video


def summarize(rows: list[dict]) -> dict:
    from vaops.components.evaluate.libero_report import wilson_interval

    n, k = len(rows), sum(r["success"] for r in rows)
    low, high = wilson_interval(k, n) if n else (0.0, 0.0)
    won = [r for r in rows if r["success"]]
    idle = [x for r in rows for x in r["idle_s"]]
    execution = [x for r in rows for x in r["execution_s"]]
    return {
        "episodes": n, "successes": k, "success_rate": k / n if n else None, "wilson95": [low, high],
        "errors": sum(r["status"] == "error" for r in rows),
        "steps_to_success_mean": statistics.mean(r["steps"] for r in won) if won else None,
        "wall_s_to_success_mean": statistics.mean(r["wall_s"] for r in won) if won else None,
        "wall_s_mean": statistics.mean(r["wall_s"] for r in rows) if rows else None,
        "idle_per_chunk_median_s": statistics.median(idle) if idle else None,
        "chunk_act_latency_median_s": statistics.median(x for r in rows for x in r["chunk_latency_s"]) if rows else None,
        "idle_fraction": sum(idle) / (sum(idle) + sum(execution)) if execution else None,
    }


def both_succeeded(rows: list[dict], modes: list[str], seeds: list[int]) -> dict:
    """Seeds every mode solved: the task's wall time and steps per mode on exactly those episodes."""
    won = [s for s in seeds if all(r["success"] for r in rows if r["seed"] == s)]
    per = {m: [r for r in rows if r["mode"] == m and r["seed"] in won] for m in modes}
    return {"seeds": won, **{m: {"wall_s_mean": statistics.mean(r["wall_s"] for r in v) if v else None,
                                 "steps_mean": statistics.mean(r["steps"] for r in v) if v else None}
                             for m, v in per.items()}}


def paired(rows: list[dict], labels: list[str], seeds: list[int]) -> dict:
    """Every variant against the first on the same seeds: the seeds only one of the two solved, and the
    exact two-sided McNemar p (a binomial test on those discordant seeds)."""
    ok = {(r["seed"], r["mode"]): r["success"] for r in rows}
    out = {}
    for other in labels[1:]:
        a_only = sum(ok[s, labels[0]] and not ok[s, other] for s in seeds)
        b_only = sum(ok[s, other] and not ok[s, labels[0]] for s in seeds)
        n, k = a_only + b_only, min(a_only, b_only)
        p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
        out[f"{other} vs {labels[0]}"] = {"first_only": a_only, "other_only": b_only, "mcnemar_exact_p": p}
    return out


def markdown(result: dict) -> str:
    modes = result["modes"]
    pct = lambda x: "–" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    num = lambda x, f="{:.1f}": "–" if x is None else f.format(x)  # noqa: E731
    lines = [
        "# " + ", ".join(modes) + " in closed loop on the same seeds (CPU)", "",
        f"{result['date']}, commit {result['commit']}: {result['task']} with `{result['checkpoint']}`, "
        f"seeds {result['seeds'][0] if result['seeds'] else '-'}-{result['seeds'][-1] if result['seeds'] else '-'} "
        f"({len(result['seeds'])} per mode, each seed run in every mode before the next), at most "
        f"{result['max_steps']} actions, {result['fps']} actions/s, operating point {result['operating_point']}"
        + (", real time (every action takes 1/fps s of wall time)" if result["real_time"] else ", unpaced")
        + f"; {result['machine']['cpus']} CPU cores, load average {result['machine']['load_avg_before'][0]:.1f} "
        f"before and {result['machine']['load_avg_after'][0]:.1f} after; {result['total_s'] / 60:.1f} min in all.", "",
        "```", result["command"], "```", "",
        "| mode | successes | success rate (Wilson 95%) | steps to success (mean) | wall s to success (mean) "
        "| wall s per episode (mean) | idle per chunk (median s) | idle share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, s in modes.items():
        lo, hi = s["wilson95"]
        lines.append(f"| {m} | {s['successes']}/{s['episodes']} | {pct(s['success_rate'])} ({pct(lo)}-{pct(hi)}) "
                     f"| {num(s['steps_to_success_mean'])} | {num(s['wall_s_to_success_mean'])} "
                     f"| {num(s['wall_s_mean'])} | {num(s['idle_per_chunk_median_s'], '{:.2f}')} "
                     f"| {pct(s['idle_fraction'])} |")
    both = result["all_succeeded"]
    first = next(iter(modes))
    for pair, d in result.get("paired", {}).items():
        other = pair.split(" vs ")[0]
        lines += ["", f"Paired by seed, {pair}: {d['first_only']} seeds only {first} solved, {d['other_only']} only "
                      f"{other} (exact McNemar p = {d['mcnemar_exact_p']:.3g})."]
    lines += ["", f"Seeds every mode solved ({len(both['seeds'])}): "
              + ", ".join(f"{m} {num(both[m]['wall_s_mean'])} s / {num(both[m]['steps_mean'])} steps"
                          for m in modes) + " (mean wall time / actions).", "",
              "| seed | " + " | ".join(modes) + " |", "| --- |" + " --- |" * len(modes)]
    for seed in result["seeds"]:
        cells = []
        for m in modes:
            r = next(r for r in result["episodes"] if r["seed"] == seed and r["mode"] == m)
            cells.append(f"{r['status']} {r['steps']} act, {r['wall_s']:.0f} s")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
