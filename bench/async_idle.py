"""The control loop's idle time with and without asynchronous execution, through the policy server.

A robot client plays the RoboTwin control loop against `vaops serve`'s websocket (random weights,
built as bench/serve.py builds them): executing a chunk takes its action count x the control period
of wall time (no sim: the keyframes are random images made beforehand), then it sends the chunk's
observation and asks for the next chunk. Idle per chunk: from the end of the chunk's last action to
the next chunk in hand, i.e. the observe and act round trips. One episode of N chunks synchronously
(the baseline), then one with `async_execution`, where the server computes each next chunk while
the robot executes the current one, then one with `async_execution: "grounded"`, where it first
re-imagines the executing chunk (one more video denoising per chunk, off the robot's path while it
fits in a chunk's execution); a short warm-up episode of each runs first.

    python bench/async_idle.py --preset tiny --device cpu --chunks 6        # smoke test
    python bench/async_idle.py --preset robotwin --device cuda --out bench/results/async_idle_h200.json

`--control-hz` is the robot's action rate (default 50: a chunk of 2 x 16 actions runs 0.64 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from serve import PROMPT, add_server_arguments, connect, episode_frames, random_weights, serve_during, server_dtype


MODES = (("sync", False), ("async", True), ("grounded", "grounded"))  # -> the reset's async_execution


def robot(url: str, preset, chunks: int, period_s: float, async_execution: bool | str, seed: int) -> list[dict]:
    """One episode of `chunks` chunks at the control rate; per chunk its execution and the idle after it."""
    first, keyframes = episode_frames(preset, seed, chunks)
    with connect(url) as infer:
        infer({"reset": True, "prompt": PROMPT, "seed": seed, "async_execution": async_execution})
        actions = infer({"obs": first, "prompt": PROMPT})["action"]
        rows = []
        for k in range(chunks):
            received = time.perf_counter()
            executed = actions.shape[2] * (actions.shape[1] - (k == 0))  # the first chunk skips its first frame
            time.sleep(max(0.0, received + executed * period_s - time.perf_counter()))
            done = time.perf_counter()
            infer({"obs": keyframes[k], "compute_kv_cache": True, "state": actions})
            observed = time.perf_counter()
            actions = infer({"obs": first, "prompt": PROMPT})["action"]
            now = time.perf_counter()
            rows.append({"chunk": k, "actions": executed, "execution_s": done - received, "idle_s": now - done,
                         "observe_s": observed - done, "act_s": now - observed})
    return rows


def summarize(rows: list[dict], warmup_chunks: int) -> dict:
    steady = [r for r in rows if r["chunk"] >= warmup_chunks]
    idle = np.array([r["idle_s"] for r in steady])
    execution = np.array([r["execution_s"] for r in steady])
    return {"chunks": len(steady), "idle_median_s": float(np.median(idle)), "idle_p95_s": float(np.percentile(idle, 95)),
            "execution_median_s": float(np.median(execution)),
            "observe_median_s": statistics.median(r["observe_s"] for r in steady),
            "act_median_s": statistics.median(r["act_s"] for r in steady),
            "idle_fraction": float(idle.sum() / (idle.sum() + execution.sum())), "per_chunk": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    parser.add_argument("--chunks", type=int, default=20, help="chunks per mode")
    parser.add_argument("--control-hz", type=float, default=50.0, help="actions per second the robot executes")
    parser.add_argument("--warmup-chunks", type=int, default=1, help="first chunks of each mode left out of the table")
    parser.add_argument("--out", help="write the results here (JSON)")
    args = parser.parse_args()
    if args.chunks <= args.warmup_chunks or args.control_hz <= 0:
        parser.error("--chunks must exceed --warmup-chunks and --control-hz must be positive")
    weights = random_weights(args)
    period = 1.0 / args.control_hz
    rows: dict[str, list[dict]] = {}

    def work(url: str) -> None:
        for mode, async_execution in MODES:
            robot(url, weights.preset, 3, period, async_execution, seed=999)  # warm-up: kernels, graphs, caches
        for mode, async_execution in MODES:
            rows[mode] = robot(url, weights.preset, args.chunks, period, async_execution, seed=0)

    serve_during(args, weights, work)
    sync, fast, grounded = (summarize(rows[m], args.warmup_chunks) for m, _ in MODES)
    keys = ("idle_median_s", "idle_p95_s", "idle_fraction")
    result = {"preset": weights.preset.name, "device": args.device, "dtype": server_dtype(args),
              "control_hz": args.control_hz, "sync": sync, "async": fast, "grounded": grounded,
              "ratio": {k: fast[k] / sync[k] for k in keys}, "ratio_grounded": {k: grounded[k] / sync[k] for k in keys}}
    if torch.cuda.is_available() and args.device != "cpu":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory {result['peak_gpu_gib']:.1f} GiB")
    print(f"\n{weights.preset.name}, {args.control_hz:g} Hz control, {sync['chunks']} chunks per mode "
          f"(after {args.warmup_chunks} left out)")
    print(f"{'':24}{'sync':>10}{'async':>10}{'grounded':>10}{'async/sync':>12}{'grnd/sync':>11}")
    for key, label in (("idle_median_s", "idle median (s)"), ("idle_p95_s", "idle p95 (s)"),
                       ("idle_fraction", "idle fraction"), ("execution_median_s", "execution / chunk (s)"),
                       ("observe_median_s", "observe round trip (s)"), ("act_median_s", "act round trip (s)")):
        print(f"{label:24}{sync[key]:10.3f}{fast[key]:10.3f}{grounded[key]:10.3f}{fast[key] / sync[key]:12.3f}"
              f"{grounded[key] / sync[key]:11.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
