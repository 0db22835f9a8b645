"""Many robots on one policy server: latency, throughput, real time and a soak, through `vaops serve`'s
websocket (the upstream protocol), with random weights built as bench/serve.py builds them.

The robots are threads of a separate client process (so their message packing does not compete with
the server for its interpreter lock); the server runs in this process with its chunk batching
(models/batch.py). Phases, each in one server run:

1. load: N robots (1, 2, 4, 8) run synchronous episodes back to back as fast as the server answers, at
   each operating point (released 25/50 steps, the paper's 3-to-s=0.6/10). Per chunk the act round trip
   (the chunk's latency) and the observe round trip; chunks per second over all robots; GPU memory.
   The in-run baseline: the same 8 robots with batching off (max_batch 1: each chunk alone). With
   `--compute-threads 1,2,4` each row runs once per number of operations in flight (the server's executor
   swapped between rows; 1 is one operation at a time).
2. real time: N robots at the control rate (50 Hz: a chunk of 32 actions executes in 0.64 s) with
   asynchronous execution at the paper's operating point, all started together; a robot is idle from
   the end of its chunk's last action to its next chunk in hand. Target: p99 at most 50 ms. Each row also
   records the longest idle at each chunk index, and the work inside it that stalls every robot (CUDA graphs
   captured, with what fixed their shapes; functions compiled; Python's garbage collections).
3. soak: `--soak-chunks` chunks over many short sessions of 8 concurrent robots; a tenth of the
   episodes drop the connection mid-episode (no close), and bad requests are mixed in on the websocket
   and on REST. Checked: no 5xx, every bad request answered in the protocol's terms and the
   connection still usable, no session left open and KV cache memory back to its level before.

    python bench/serve_load.py --preset tiny --device cpu --robots 1,2 --chunks 3 --realtime-chunks 4 --soak-chunks 20
    python bench/serve_load.py --preset robotwin --device cuda --out-dir bench/results
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import multiprocessing
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from vaops.models.cuda_graphs import CAPTURE_HOOKS
from vaops.serving.config import ServeConfig
from vaops.serving.server import started_pools
from serve import PROMPT, add_server_arguments, connect, episode_frames, random_weights, serve_during, server_dtype

# ----- the robots (client process) -----


def robot(url: str, preset, chunks: int, seed: int, operating_point: str, period_s: float,
          async_execution: bool, start: threading.Barrier | None, delay_s: float = 0.0) -> list[dict]:
    """One episode, `delay_s` after the fleet's start; per chunk the act and observe round trips and, at a
    control rate, the idle time."""
    first, keyframes = episode_frames(preset, seed, 2)  # later chunks reuse the second's: the server does not look
    rows = []
    with connect(url) as infer:
        infer({"reset": True, "prompt": PROMPT, "seed": seed, "operating_point": operating_point,
               "async_execution": async_execution})
        if start is not None:
            start.wait()
        time.sleep(delay_s)
        t0 = time.perf_counter()
        actions = infer({"obs": first, "prompt": PROMPT})["action"]
        act_s = time.perf_counter() - t0
        for k in range(chunks):
            received = time.perf_counter()
            executed = actions.shape[2] * (actions.shape[1] - (k == 0))  # the first chunk skips its first frame
            if period_s > 0:
                time.sleep(max(0.0, received + executed * period_s - time.perf_counter()))
            done = time.perf_counter()
            infer({"obs": keyframes[min(k, 1)], "compute_kv_cache": True, "state": actions})
            observed = time.perf_counter()
            rows.append({"chunk": k, "act_s": act_s, "observe_s": observed - done, "end": observed})
            if k + 1 < chunks:
                actions = infer({"obs": first, "prompt": PROMPT})["action"]
                now = time.perf_counter()
                act_s = now - observed
                rows[-1]["idle_s"] = now - done
    return rows


def fleet(url: str, preset_name: str, robots: int, chunks: int, operating_point: str, period_s: float = 0.0,
          async_execution: bool = False, seed0: int = 0, staggered: bool = False) -> dict:
    """`robots` robots started together, or (`staggered`) spread evenly over one chunk's execution at the control
    rate, as robots that were not started at one instant; their rows and the wall time from start to the last
    observe."""
    from vaops.models.config import get_preset

    preset = get_preset(preset_name)
    start = threading.Barrier(robots)
    spread_s = preset.frame_chunk_size * preset.action_per_frame * period_s if staggered else 0.0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(robots) as pool:
        futures = [pool.submit(robot, url, preset, chunks, seed0 + r, operating_point, period_s, async_execution,
                               start, spread_s * r / robots) for r in range(robots)]
        rows = [f.result() for f in futures]
    return {"rows": rows, "wall_s": max(r[-1]["end"] for r in rows) - t0}


def soak(url: str, preset_name: str, total_chunks: int, robots: int, operating_point: str, seed0: int) -> dict:
    """Short episodes by `robots` concurrent clients until `total_chunks` chunks were served; some drop
    their connection mid-episode and bad requests are mixed in. Counts what the server answered."""
    from vaops.models.config import get_preset

    preset = get_preset(preset_name)
    http = url.replace("ws://", "http://")
    lock = threading.Lock()
    stats = {"chunks": 0, "episodes": 0, "dropped": 0, "bad_ws": 0, "bad_ws_refused": 0, "bad_rest": 0,
             "rest_4xx": 0, "rest_5xx": 0}
    failures: list[str] = []

    def count(key: str, n: int = 1) -> None:
        with lock:
            stats[key] += n

    def bad_rest(rng: random.Random) -> None:
        bodies = [b"{not json", json.dumps({"inputs": []}).encode(),
                  json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2, 3],
                                          "data": [300] * 12}]}).encode(),
                  json.dumps({"parameters": {"session_id": "never-opened", "op": "act"},
                              "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0]}]}).encode()]
        r = httpx.post(f"{http}/v2/models/lingbot-va/infer", content=rng.choice(bodies),
                       headers={"content-type": "application/json"}, timeout=60)
        count("bad_rest")
        if 400 <= r.status_code < 500:
            count("rest_4xx")
        elif r.status_code >= 500:
            count("rest_5xx")

    def client(worker: int) -> None:
        rng = random.Random(seed0 + worker)
        first, keyframes = episode_frames(preset, seed0 + worker, 2)
        while True:
            with lock:
                if stats["chunks"] >= total_chunks:
                    return
            chunks = rng.randint(1, 6)
            drop_at = rng.randrange(chunks) if rng.random() < 0.1 else None
            try:
                with connect(url) as infer:
                    infer({"reset": True, "prompt": PROMPT, "seed": rng.randrange(2**31),
                           "operating_point": operating_point, "async_execution": rng.random() < 0.5})
                    for k in range(chunks):
                        if rng.random() < 0.15:  # a bad message: refused in a text frame, the episode goes on
                            count("bad_ws")
                            try:
                                infer(rng.choice([{"obs": "not an image"}, {"obs": {"cam": np.zeros((2, 2), np.uint8)}},
                                                  {"reset": True, "prompt": 7}, {"obs": first, "seq": -1}]))
                            except RuntimeError:
                                count("bad_ws_refused")
                        actions = infer({"obs": first, "prompt": PROMPT})["action"]
                        count("chunks")
                        if k == drop_at:
                            count("dropped")
                            raise _Drop
                        infer({"obs": keyframes[min(k, 1)], "compute_kv_cache": True, "state": actions})
                        if rng.random() < 0.05:
                            bad_rest(rng)
                count("episodes")
            except _Drop:
                pass  # the connection ended without a close: the server must close the session itself
            except Exception as e:  # noqa: BLE001 - counted and reported, the soak goes on
                with lock:
                    failures.append(f"{type(e).__name__}: {e}"[:300])

    with ThreadPoolExecutor(robots) as pool:
        list(pool.map(client, range(robots)))
    return {**stats, "other_failures": failures}


class _Drop(Exception):
    pass


# ----- the server side (this process) -----


def soak_round(pool, url: str, name: str, args: argparse.Namespace, robots: int, point: str, seed0: int) -> dict:
    """One soak on the running server, and what it left: open sessions, KV cache bytes, readiness and this
    process's GPU memory before and after (the server runs here). Rounds after the first show whether
    memory stays flat once the session pool has filled (its caches stay allocated for reuse)."""
    http = url.replace("ws://", "http://")
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    t0 = time.perf_counter()
    stats = pool.apply(soak, (url, name, args.soak_chunks, robots, point, seed0))
    time.sleep(1.0)  # the server closes dropped sessions when it notices the disconnect
    text = httpx.get(f"{http}/metrics", timeout=10).text
    stats.update({"wall_s": time.perf_counter() - t0,
                  "sessions_open_after": metric(text, "vaops_sessions"),
                  "cache_bytes_after": metric(text, "vaops_kv_cache_bytes"),
                  "ready_after": httpx.get(f"{http}/v2/health/ready", timeout=10).status_code == 200,
                  "gpu_bytes_before": before,
                  "gpu_bytes_after": torch.cuda.memory_allocated() if torch.cuda.is_available() else 0})
    return stats


def soak_lines(rounds: list[dict]) -> list[str]:
    """One line a round, then whether GPU memory stayed flat after the first round."""
    lines = [""]
    for k, s in enumerate(rounds, 1):
        lines.append(f"Soak round {k}: " + ", ".join(f"{key} {v}" for key, v in s.items() if key != "other_failures")
                     + f"; failures other than the planned ones: {len(s['other_failures'])}")
    if len(rounds) > 1:
        after = [s["gpu_bytes_after"] / 1e9 for s in rounds]
        lines += ["", "GPU memory allocated after each round (GB): " + ", ".join(f"{a:.2f}" for a in after)
                  + f"; after round 1 it changed by {(after[-1] - after[0]) * 1e3:+.1f} MB over "
                  f"{len(rounds) - 1} more round(s)."]
    return lines


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load_row(result: dict, robots: int, operating_point: str, batching: bool, warmup: int, threads: int = 1) -> dict:
    rows = [r for episode in result["rows"] for r in episode if r["chunk"] >= warmup]
    act = [r["act_s"] for r in rows]
    chunks = sum(len(e) for e in result["rows"])
    return {"operating_point": operating_point, "robots": robots, "batching": batching, "compute_threads": threads,
            "chunks": chunks, "act_p50_s": statistics.median(act), "act_p99_s": percentile(act, 99),
            "observe_p50_s": statistics.median(r["observe_s"] for r in rows),
            "chunks_per_s": chunks / result["wall_s"], "wall_s": result["wall_s"],
            "gpu_gib": torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0}


def realtime_row(result: dict, robots: int, operating_point: str, warmup: int, threads: int = 1,
                 ahead_threads: int = 0, deferred: bool = True, staggered: bool = False) -> dict:
    timed = [(r["chunk"], r["idle_s"]) for e in result["rows"] for r in e if "idle_s" in r and r["chunk"] >= warmup]
    idle = [s for _, s in timed]
    # The longest idle over the robots at each chunk index: whether the tail sits in the first rounds (robots
    # started together all need a chunk in the same window) or anywhere.
    worst: dict[int, float] = {}
    for chunk, s in timed:
        worst[chunk] = max(worst.get(chunk, 0.0), s)
    return {"operating_point": operating_point, "robots": robots, "compute_threads": threads,
            "ahead_threads": ahead_threads, "deferred_observations": deferred, "staggered": staggered,
            "chunks_timed": len(idle),
            "idle_p50_s": statistics.median(idle), "idle_p99_s": percentile(idle, 99), "idle_max_s": max(idle),
            "idle_max_by_chunk_s": dict(sorted(worst.items()))}


def agreement(weights, robots: int, chunks: int, operating_point: str) -> dict:
    """The same episodes run alone and then batched (robots in threads, in step): the largest difference
    of their actions (robot units) and of their imagined latents (relative to the latents' scale)."""
    from vaops.models.batch import ChunkBatcher

    preset = weights.preset

    def episode(policy, seed: int, start: threading.Barrier | None) -> list:
        first, keyframes = episode_frames(preset, seed, 2)
        policy.reset(PROMPT, seed=seed, operating_point=operating_point)
        out = []
        for k in range(chunks):
            if start is not None:
                start.wait()
            chunk = policy.act(first if k == 0 else None)
            out.append((chunk.actions, chunk.latents.float().cpu()))
            policy.observe(keyframes[min(k, 1)], chunk.actions)
        return out

    t0 = time.perf_counter()
    alone_policy = weights.new_policy()
    alone = [episode(alone_policy, seed, None) for seed in range(robots)]
    print(f"agreement: {robots} episodes alone in {time.perf_counter() - t0:.1f} s", flush=True)
    del alone_policy
    batcher = weights.batcher = ChunkBatcher(max_batch=robots, gather_s=0.05)  # robots in step share every batch
    policies = [weights.new_policy() for _ in range(robots)]
    weights.batcher = None  # the server makes its own
    start = threading.Barrier(robots)
    with ThreadPoolExecutor(robots) as pool:
        together = list(pool.map(lambda r: episode(policies[r], r, start), range(robots)))
    sizes = dict(batcher.batch_sizes)
    print(f"agreement: batched in {time.perf_counter() - t0:.1f} s (since the start)", flush=True)
    policies.clear()  # their KV caches (7 GB each at the robotwin preset)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    actions = max(float(np.abs(a[0] - b[0]).max()) for x, y in zip(alone, together) for a, b in zip(x, y))
    latents = max(float((a[1] - b[1]).norm() / a[1].norm().clamp_min(1e-12)) for x, y in zip(alone, together)
                  for a, b in zip(x, y))
    return {"robots": robots, "chunks": chunks, "operating_point": operating_point, "batch_sizes": sizes,
            "actions_max_abs_diff": actions, "latents_max_rel_l2": latents}


class GcPauses:
    """Python's garbage collections in this (the server's) process: their count, seconds and longest. A
    collection holds the GIL, so every thread that serves robots waits for it."""

    def __init__(self):
        self.count, self.seconds, self.longest, self._start = 0, 0.0, 0.0, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        took = time.perf_counter() - self._start
        self.count, self.seconds, self.longest = self.count + 1, self.seconds + took, max(self.longest, took)


GC = GcPauses()
CAPTURED: list[tuple[str, float]] = []  # every CUDA graph captured in this process: (what fixed its shapes, s)


def server_counters() -> dict[str, float]:
    """The served process's counters a real-time row reports the increase of: the observations' waits for
    chunks computed ahead (count, sum: the server's share of the robots' idle time), and the work that stalls every
    robot when it happens mid-row (CUDA graphs captured, their seconds, functions compiled, garbage collections)."""
    from prometheus_client import REGISTRY
    names = {"ahead_waits": "vaops_ahead_wait_seconds_count", "ahead_wait_s": "vaops_ahead_wait_seconds_sum",
             "graph_captures": "vaops_cuda_graph_captures_total",
             "graph_capture_s": "vaops_cuda_graph_capture_seconds_total",
             "compiled_frames": "vaops_compiled_frames"}
    return {**{key: REGISTRY.get_sample_value(name) or 0.0 for key, name in names.items()},
            "gc_collections": GC.count, "gc_s": GC.seconds}


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    parser.add_argument("--robots", default="1,2,4,8", help="robot counts of the load phase")
    parser.add_argument("--operating-points", default="released,paper",
                        help="operating points of the load phase; `name=1,8` gives one its own robot counts")
    parser.add_argument("--chunks", type=int, default=8, help="chunks per robot in the load phase")
    # 48: past the robotwin window (attn_window 72: 36 chunks). A robot's idle grows as its cache fills, so rows of
    # 16 chunks showed 8 robots in real time where 48 did not (results/serve_load_full_episodes_h200.md).
    parser.add_argument("--realtime-chunks", type=int, default=48, help="chunks per robot of a real-time row")
    parser.add_argument("--control-hz", type=float, default=50.0)
    parser.add_argument("--soak-chunks", type=int, default=1000)
    parser.add_argument("--soak-rounds", type=int, default=1,
                        help="soaks one after another on the same server (2+: is memory flat once the pool is full)")
    parser.add_argument("--warmup-chunks", type=int, default=1, help="first chunks of an episode not in the stats")
    parser.add_argument("--agreement-robots", type=int, default=3,
                        help="robots of the check that batched chunks equal chunks run alone (0: skip)")
    parser.add_argument("--deadline-s", type=float, default=540.0,
                        help="skip the phases that would start after this many seconds (results so far are kept)")
    parser.add_argument("--out-dir", default=None, help="write serve_load.json and serve_load.md here")
    parser.add_argument("--stack-dumps", help="file for every thread's stack each 60 s after the first 120 s "
                        "(a run that seems stuck shows where)")
    parser.add_argument("--phases", default="agreement,load,realtime,soak", help="which phases run")
    parser.add_argument("--compute-threads", default=None,
                        help="episode operations in flight (vaops serve --compute-threads), each list entry measured in "
                        "turn on one server (its executor swapped between rows); default: the server's")
    parser.add_argument("--ahead-threads", default=None,
                        help="real time: threads of the chunks computed ahead (vaops serve --ahead-threads; 0: on the "
                        "compute threads), each list entry measured in turn; default: the server's for each "
                        "--compute-threads entry")
    parser.add_argument("--deferred-observations", default="1",
                        help="real time: 1 (the server's way: an observation is acknowledged at once and observed with "
                        "the next chunk computed ahead), 0 (observed before the reply), or both: 1,0")
    parser.add_argument("--realtime-stagger", action="store_true",
                        help="real time: each row also with the robots' starts spread over one chunk's execution "
                        "(robots not started at one instant; without it they all start together)")
    parser.add_argument("--realtime-robots", default=None, help="robot counts of the real-time phase (default: 1 and "
                        "the largest of --robots)")
    parser.add_argument("--realtime-max-batch", default=None,
                        help="real time: each row once per batch limit in this list, e.g. 1,8 (the server started with "
                        "--max-batch at least the largest)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="the server's batch limit (default: the largest robot count; 1: batching off)")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    faulthandler.enable()  # a crash in native code prints every thread's stack
    CAPTURE_HOOKS.append(lambda label, took: CAPTURED.append((label, took)))
    if args.stack_dumps:
        faulthandler.dump_traceback_later(120, repeat=True, file=open(args.stack_dumps, "w"))  # noqa: SIM115
    counts = [int(n) for n in args.robots.split(",")]
    per_point = {}
    for item in args.operating_points.split(" "):
        name_, _, own = item.partition("=")
        for point in name_.split(","):
            per_point[point] = [int(n) for n in own.split(",")] if own else counts
    points = list(per_point)
    began = time.perf_counter()
    weights = random_weights(args)
    name = weights.preset.name
    result: dict = {"preset": name, "device": args.device, "dtype": server_dtype(args), "fp8": args.fp8, "load": [],
                    "realtime": [], "skipped": []}
    ctx = multiprocessing.get_context("spawn")
    if "agreement" in phases and args.agreement_robots > 1:
        result["agreement"] = agreement(weights, args.agreement_robots, 3, points[-1])
        print(json.dumps(result["agreement"]), flush=True)

    def late(phase: str) -> bool:
        if time.perf_counter() - began > args.deadline_s:
            result["skipped"].append(phase)
            print(f"deadline: skipping {phase}", flush=True)
            return True
        return False

    on_gpu = args.device != "cpu"
    levels = ([int(c) for c in args.compute_threads.split(",")] if args.compute_threads
              else [ServeConfig().thread_counts(on_gpu)[0]])

    def ahead_levels(c: int) -> list[int]:
        if args.ahead_threads:
            return [int(a) for a in args.ahead_threads.split(",")]
        return [ServeConfig(compute_threads=c).thread_counts(on_gpu)[1]]

    realtime_counts = ([int(n) for n in args.realtime_robots.split(",")] if args.realtime_robots
                       else sorted({1, max(counts)}))
    served: list = []  # the PolicyModel, handed over by serve_during

    def threads(c: int, ahead: int | None = None) -> None:
        """The server's executors with c threads (and `ahead` for chunks computed ahead; None: the server's
        default for c) from the next request on (none is in flight between rows)."""
        episodes = served[0].episodes
        ahead = ahead_levels(c)[0] if ahead is None else ahead
        for pool in (episodes.executor, episodes.ahead_executor):
            if pool is not None:
                pool.shutdown(wait=True)
        episodes.executor, episodes.ahead_executor = started_pools(c, ahead, weights.device)

    def work(url: str) -> None:
        batcher = weights.batcher
        with ctx.Pool(1) as pool:
            run = lambda *a, **k: pool.apply(fleet, (url, name, *a), k)  # noqa: E731
            for point in points if "load" in phases else []:
                counts_here = per_point[point]
                for n in counts_here:  # warm-up: compilation and graphs of each batch size
                    if not late(f"warm-up {point} x{n}"):
                        run(n, args.chunks, point, seed0=900)
                for c in levels:
                    threads(c)
                    run(max(counts_here), 2, point, seed0=950)  # untimed: the new threads' first operations
                    for n in counts_here:
                        if late(f"load {point} x{n} threads {c}"):
                            continue
                        row = load_row(run(n, args.chunks, point), n, point, batcher is not None, args.warmup_chunks, c)
                        result["load"].append(row)
                        print(json.dumps(row), flush=True)
                        report(result, args, quiet=True)
                n = max(counts_here)
                if n > 1 and batcher is not None and not late(f"load {point} x{n} unbatched"):
                    batcher.max_batch = 1
                    try:
                        row = load_row(run(n, args.chunks, point), n, point, False, args.warmup_chunks, levels[-1])
                    finally:
                        batcher.max_batch = max(counts)
                    result["load"].append(row)
                    print(json.dumps(row), flush=True)
                    report(result, args, quiet=True)
            point = "paper" if "paper" in points else points[-1]
            if "realtime" in phases and not late("real time warm-up"):  # the asynchronous levels' graphs, untimed
                run(max(counts), args.realtime_chunks, point, period_s=1.0 / args.control_hz, async_execution=True,
                    seed0=600)
            settings = [(c, a, d == "1") for c in levels for a in ahead_levels(c)
                        for d in args.deferred_observations.split(",")]
            batches = [int(b) for b in args.realtime_max_batch.split(",")] if args.realtime_max_batch else [None]
            for c, a, deferred in settings if "realtime" in phases else []:
                threads(c, a)
                served[0].episodes.defer_observations = deferred
                run(max(counts), 2, point, seed0=950)  # untimed, as in the load phase
                for n, staggered, b in [(n, st, b) for n in realtime_counts
                                        for st in (False, True)[:1 + args.realtime_stagger] for b in batches]:
                    if late(f"real time x{n} threads {c} ahead {a} deferred {deferred} staggered {staggered} batch {b}"):
                        continue
                    if b is not None and batcher is not None:
                        batcher.max_batch = b
                        batcher.batch_sizes.clear()
                    before, GC.longest, captured_before = server_counters(), 0.0, len(CAPTURED)
                    res = run(n, args.realtime_chunks, point, period_s=1.0 / args.control_hz, async_execution=True,
                              seed0=500, staggered=staggered)
                    row = realtime_row(res, n, point, args.warmup_chunks, c, a, deferred, staggered)
                    if batcher is not None:
                        row["max_batch"] = batcher.max_batch
                        row["batch_sizes"] = dict(sorted(batcher.batch_sizes.items()))
                    grew = {k: v - before[k] for k, v in server_counters().items()}
                    waits = grew["ahead_waits"]
                    row["server_ahead_wait_mean_s"] = grew["ahead_wait_s"] / waits if waits else None
                    row["stalls"] = {**{k: grew[k] for k in ("graph_captures", "graph_capture_s", "compiled_frames",
                                                              "gc_collections", "gc_s")}, "gc_longest_s": GC.longest,
                                     "captured": [[label, round(took, 3)] for label, took in CAPTURED[captured_before:]]}
                    result["realtime"].append(row)
                    print(json.dumps(row), flush=True)
                    report(result, args, quiet=True)
            rounds = args.soak_rounds if "soak" in phases else 0
            for k in range(rounds):
                if late(f"soak round {k + 1}"):
                    break
                result.setdefault("soak", []).append(soak_round(pool, url, name, args, max(counts), point, seed0=7 + k))
                print(json.dumps({key: v for key, v in result["soak"][-1].items() if key != "other_failures"}),
                      flush=True)
                report(result, args, quiet=True)
        if batcher is not None:
            result["batch_sizes"] = dict(sorted(batcher.batch_sizes.items()))

    batch = max(counts) if args.max_batch is None else args.max_batch
    result["max_batch"] = batch
    result["compute_threads"] = levels
    serve_during(args, weights, work, on_model=served.append, max_sessions=max(counts) + 2, max_batch=batch,
                 compute_threads=max(levels))
    if torch.cuda.is_available() and args.device != "cpu":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    report(result, args)


def report(result: dict, args: argparse.Namespace, quiet: bool = False) -> None:
    """The tables (printed unless quiet) and, with --out-dir, the JSON and Markdown files: written after
    every phase too, so a run cut short keeps what it measured."""
    weights = result["dtype"] + (", FP8 block GEMMs" if result.get("fp8") else "")
    lines = [f"# Many robots on one server ({result['preset']}, {result['device']}, {weights})", "",
             "Command: `python bench/serve_load.py " + " ".join(a for a in __import__("sys").argv[1:]) + "`", ""]
    if result["load"]:
        lines += ["| operating point | robots | batched | in flight | act p50 s | act p99 s | observe p50 s | chunks/s "
                  "| x 1 robot | GPU GiB |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["load"]:
        # against one robot at the same point with as many operations in flight: run alone, that robot's chunks
        # are never batched
        one = next((r for r in result["load"] if r["operating_point"] == row["operating_point"] and r["robots"] == 1
                    and r["compute_threads"] == row["compute_threads"]), None)
        speedup = "-" if one is None else f"{row['chunks_per_s'] / one['chunks_per_s']:.2f}x"
        memory = "-" if row.get("gpu_gib") is None else f"{row['gpu_gib']:.1f}"
        lines.append(f"| {row['operating_point']} | {row['robots']} | {'yes' if row['batching'] else 'no'} | "
                     f"{row['compute_threads']} | {row['act_p50_s']:.3f} | {row['act_p99_s']:.3f} | {row['observe_p50_s']:.3f} | "
                     f"{row['chunks_per_s']:.2f} | {speedup} | {memory} |")
    if result["realtime"]:
        lines += ["", f"Real time: asynchronous execution at {args.control_hz:g} Hz (robot idle from the end of a "
                  "chunk's last action to the next chunk in hand).", "",
                  "| operating point | robots | starts | in flight | ahead threads | observation | batch | chunks timed "
                  "| idle p50 s | idle p99 s | idle max s | server: wait for the chunk ahead, mean s "
                  "| graphs captured (s) | compiled | GC pauses: s, longest s |",
                  "| --- | ---: | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in result["realtime"]:
            observation = "deferred" if row.get("deferred_observations", False) else "in the reply"
            starts = "spread" if row.get("staggered") else "together"
            wait = "-" if row.get("server_ahead_wait_mean_s") is None else f"{row['server_ahead_wait_mean_s']:.3f}"
            batch = "off" if row.get("max_batch", 1) == 1 else f"{row['max_batch']}: {row.get('batch_sizes')}"
            stalls = row.get("stalls")  # rows of runs before stop 42 lack them
            captured = "-" if stalls is None else f"{stalls['graph_captures']:.0f} ({stalls['graph_capture_s']:.2f})"
            compiled = "-" if stalls is None else f"{stalls['compiled_frames']:.0f}"
            pauses = "-" if stalls is None else f"{stalls['gc_s']:.3f}, {stalls['gc_longest_s']:.3f}"
            lines.append(f"| {row['operating_point']} | {row['robots']} | {starts} | {row['compute_threads']} | "
                         f"{row.get('ahead_threads', 0)} | {observation} | {batch} | {row['chunks_timed']} | "
                         f"{row['idle_p50_s']:.3f} | {row['idle_p99_s']:.3f} | {row['idle_max_s']:.3f} | {wait} | "
                         f"{captured} | {compiled} | {pauses} |")
        by_chunk = [f"- row {i + 1}: " + ", ".join(f"{k}: {v:.3f}" for k, v in row["idle_max_by_chunk_s"].items())
                    for i, row in enumerate(result["realtime"]) if row.get("idle_max_by_chunk_s")]
        if by_chunk:
            lines += ["", "Longest idle (s) at each chunk index, over the robots, per row above:", *by_chunk]
        captures = [f"- row {i + 1}: " + "; ".join(f"{label} ({took:.2f} s)"
                                                    for label, took in row["stalls"]["captured"])
                    for i, row in enumerate(result["realtime"]) if row.get("stalls", {}).get("captured")]
        if captures:
            lines += ["", "CUDA graphs captured during a row (what fixed their shapes):", *captures]
    if "agreement" in result:
        a = result["agreement"]
        lines += ["", f"Batched against alone ({a['robots']} robots, {a['chunks']} chunks each, {a['operating_point']}, "
                  f"batches {a['batch_sizes']}): actions differ by at most {a['actions_max_abs_diff']:.2e} "
                  f"(robot units), imagined latents by {a['latents_max_rel_l2']:.2e} (relative L2)."]
    if "soak" in result:
        lines += soak_lines(result["soak"])
    if result["skipped"]:
        lines += ["", "Skipped at the deadline: " + ", ".join(result["skipped"])]
    text = "\n".join(lines) + "\n"
    if not quiet:
        print("\n" + text)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve_load.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "serve_load.md").write_text(text)


if __name__ == "__main__":
    main()
