"""Several robots' chunks on one GPU at once: each policy on its own CUDA stream (models/policy.py), at most
`c` episode operations in flight, as `vaops serve --compute-threads c` runs them.

Why it may pay: an action step (32 tokens) is bound by reading the weights and the cache, with many SMs idle
between and inside its ~20 small kernels a layer; a video pass (2 x 240 tokens) is compute bound. Robots
whose operations overlap fill each other's idle SMs. Per-robot results cannot change (each policy's kernels
run in the same order on its own stream); the run checks it against the baseline's actions.

The in-run baseline is c = 1: one operation at a time, the server's behaviour until stop 36. N warm policies
(Policy.warm_up: every graph captured) run synchronous episodes of act + observe (VAE encode included) as
fast as they are answered, all started together; chunks per second over all robots, and each operation's
latency.

    python bench/concurrent_chunks.py --preset tiny --device cpu --robots 2 --chunks 2 --concurrency 1,2   # smoke
    python bench/concurrent_chunks.py --preset robotwin --device cuda --fp8 --robots 8 --concurrency 1,2,4 \\
        --operating-points paper,released --out bench/results/concurrent_chunks_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
from serve import PROMPT, add_server_arguments, episode_frames, random_weights, run_direct
from serve_load import percentile

from vaops.models.batch import ChunkBatcher
from vaops.models.policy import allow_concurrent_policies
from vaops.serving.sessions import pooled_policy


def fleet(policies: list, chunks: int, point: str, concurrency: int, seed0: int, async_execution: bool = False) -> dict:
    """Every policy runs one episode of `chunks` chunks in its own thread, at most `concurrency` operations at
    once; returns chunks/s over all, per-operation latencies and each robot's actions. `async_execution`: after
    the first act, each chunk is computed ahead (act_ahead, on the policy's lower-priority stream) before the
    executing chunk's observation, so the run also checks that a policy's two streams keep its order."""
    gate = threading.Semaphore(concurrency)
    start = threading.Barrier(len(policies) + 1)
    frames = [episode_frames(p.preset, seed0 + r, chunks) for r, p in enumerate(policies)]
    lat: dict[str, list[float]] = {"act": [], "observe": []}
    actions: list[list[np.ndarray]] = [[] for _ in policies]
    errors: list[BaseException] = []

    def timed(kind: str, fn, *args):
        with gate:
            t0 = time.perf_counter()
            out = fn(*args)
            lat[kind].append(time.perf_counter() - t0)
        return out

    def robot(r: int) -> None:
        policy = policies[r]
        first, keyframes = frames[r]
        try:
            with gate:
                policy.reset(PROMPT, seed=seed0 + r, operating_point=point, synchronous=not async_execution)
            start.wait()
            if async_execution:
                executing = timed("act", policy.act, first)
                actions[r].append(executing.actions)
                for k in range(1, chunks + 1):
                    ahead = timed("act", policy.act_ahead) if k < chunks else None
                    timed("observe", policy.observe, keyframes[k - 1], executing.actions)
                    if ahead is not None:
                        actions[r].append(ahead.actions)
                        executing = ahead
                return
            for k in range(chunks):
                chunk = timed("act", policy.act, first if k == 0 else None)
                actions[r].append(chunk.actions)
                timed("observe", policy.observe, keyframes[k], chunk.actions)
        except BaseException as e:  # reported after the join
            errors.append(e)
            start.abort()

    threads = [threading.Thread(target=robot, args=(r,)) for r in range(len(policies))]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:  # a robot failed before the start: its error is raised below
        pass
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"wall_s": wall, "chunks_per_s": len(policies) * chunks / wall, "latency": lat, "actions": actions}


def quantiles(xs: list[float]) -> dict:
    return {"p50_s": statistics.median(xs), "p99_s": percentile(xs, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    parser.add_argument("--robots", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=4, help="chunks per robot and run (the first included)")
    parser.add_argument("--concurrency", default="1,2,4", help="operations in flight; the first is the baseline")
    parser.add_argument("--operating-points", default="paper,released")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip Policy.warm_up (minutes for 8 robotwin policies): the untimed first run of each point "
                        "captures the graphs its chunks use")
    parser.add_argument("--async-execution", action="store_true",
                        help="episodes in asynchronous execution (act_ahead, then the executing chunk's observation)")
    parser.add_argument("--max-batch", type=int, default=1,
                        help="above 1: each level above one in flight runs twice, with action steps due together "
                        "batched (models/batch.py, at most this many robots) and without")
    parser.add_argument("--batch-wait-ms", default="0",
                        help="with --max-batch: a batched row for each of these gathering windows (ChunkBatcher.gather_s)")
    parser.add_argument("--out", help="JSON file; the Markdown table goes beside it")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    weights = random_weights(args)
    if args.max_batch > 1:  # before the policies are made: their engines join it, their warm-up captures its graphs
        weights.batcher = ChunkBatcher(max_batch=args.max_batch)
    allow_concurrent_policies()
    t0 = time.perf_counter()
    policies = [pooled_policy(weights, warm_up=weights.on_gpu and not args.no_warm_up) for _ in range(args.robots)]
    print(f"{args.robots} policies warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
    if weights.batcher is not None:  # a batch of each size: its graphs
        print(f"batches of 2-{args.max_batch} warmed up: {weights.batcher.warm_up(policies[0].engine)}", flush=True)
    rows = []
    for point in args.operating_points.split(","):
        # This point's graphs, outside the timing, all captured by this one thread, as a server's executor
        # thread captures several sessions' graphs.
        for policy in policies:
            run_direct(policy, 1, args.chunks, seed0=900, operating_point=point)
        if args.async_execution:  # and those of its chunks computed ahead, untimed
            fleet(policies, args.chunks, point, max(levels), seed0=900, async_execution=True)
        base = None
        waits = [float(w) for w in args.batch_wait_ms.split(",")]
        settings = [(c, b, w) for c in levels
                    for b, w in ([(1, 0.0)] + [(args.max_batch, w) for w in waits] if c > 1 and args.max_batch > 1
                                 else [(1, 0.0)])]
        for c, batch, wait_ms in settings:
            if weights.batcher is not None:
                weights.batcher.max_batch = batch
                weights.batcher.gather_s = wait_ms / 1e3
                weights.batcher.batch_sizes.clear()
            res = fleet(policies, args.chunks, point, c, seed0=0, async_execution=args.async_execution)
            if base is None:
                base = res
            diff = max(float(np.abs(a - b).max()) for x, y in zip(base["actions"], res["actions"]) for a, b in zip(x, y))
            rel = max(float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
                      for x, y in zip(base["actions"], res["actions"]) for a, b in zip(x, y))
            row = {"operating_point": point, "robots": args.robots, "concurrency": c, "max_batch": batch,
                   "batch_wait_ms": wait_ms, "actions_max_rel_l2_vs_baseline": rel,
                   "async": args.async_execution,
                   "chunks_per_s": res["chunks_per_s"], "x_one_at_a_time": res["chunks_per_s"] / base["chunks_per_s"],
                   "act": quantiles(res["latency"]["act"]), "observe": quantiles(res["latency"]["observe"]),
                   "actions_max_abs_diff_vs_baseline": diff}
            if weights.batcher is not None:
                row["batch_sizes"] = dict(sorted(weights.batcher.batch_sizes.items()))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"preset": weights.preset.name, "device": args.device, "fp8": args.fp8, "torch": torch.__version__,
              "robots": args.robots, "chunks": args.chunks, "rows": rows}
    if torch.cuda.is_available() and args.device != "cpu":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    lines = [f"# {args.robots} robots' chunks at once on one {args.device} ({weights.preset.name}"
             f"{', FP8 block GEMMs' if args.fp8 else ''})", "",
             "Command: `python bench/concurrent_chunks.py " + " ".join(__import__("sys").argv[1:]) + "`", "",
             "| operating point | in flight | batch (wait ms) | batch sizes | chunks/s | x one at a time | act p50 s "
             "| act p99 s | observe p50 s | actions vs baseline (max abs, rel L2) |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        batch = "off" if r["max_batch"] == 1 else f"{r['max_batch']} ({r['batch_wait_ms']:g})"
        lines.append(f"| {r['operating_point']} | {r['concurrency']} | {batch} | {r.get('batch_sizes') or '-'} | "
                     f"{r['chunks_per_s']:.2f} | "
                     f"{r['x_one_at_a_time']:.2f}x | {r['act']['p50_s']:.3f} | {r['act']['p99_s']:.3f} | "
                     f"{r['observe']['p50_s']:.3f} | {r['actions_max_abs_diff_vs_baseline']:.1e}, "
                     f"{r['actions_max_rel_l2_vs_baseline']:.1e} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
