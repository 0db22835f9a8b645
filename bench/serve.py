"""Per-chunk latency through the policy server vs the Policy called directly, same weights, same
process, same inputs: the server's overhead (msgpack, websocket, session lookup, worker thread).

Both sides run the upstream loop: `act` (one chunk) then `observe` (the executed chunk's
keyframes and actions), episode by episode in alternation (direct, served, direct, ...) so that
a busy machine slows both alike; the direct chunks form the baseline. The direct policy is kept across
episodes, as the server keeps its first session, and warmed up by an untimed episode as long as the timed
ones (every cache level they reach captured), as the server's is by its warm-up. Random weights; the text
encoder, used only at `reset`, is shrunk to one layer so that building the random `robotwin`
weights takes seconds. The client runs as a thread of the server's process, so its share of the
interpreter lock counts against the server: a separate robot process sees a little less overhead.

    python bench/serve.py                                    # tiny preset, CPU
    python bench/serve.py --preset robotwin --device cuda    # 5.09 B transformer in bf16, one GPU
    python bench/serve.py --preset robotwin --device cuda --operating-points paper,released
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import torch
import websockets.sync.client

from vaops.models.checkpoint import build_random_weights
from vaops.models.config import get_preset
from vaops.serving.config import ServeConfig
from vaops.models.msgpack_numpy import packb, unpackb
from vaops.serving.server import DTYPES, model_from_weights, serve
from vaops.serving.sessions import pooled_policy

PROMPT = "stack the red block on the blue block"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def episode_frames(preset, seed: int, chunks: int) -> tuple[dict, list[list[dict]]]:
    """First observation and per-chunk keyframes (4 per executed latent frame, none for the first)."""
    rng = np.random.default_rng(seed)

    def frame():
        return {c.key: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in preset.cameras}

    first = frame()
    per_latent = preset.frames_per_latent
    keyframes = [[frame() for _ in range((preset.frame_chunk_size - (k == 0)) * per_latent)] for k in range(chunks)]
    return first, keyframes


def run_direct(policy, episodes: int, chunks: int, seed0: int, operating_point: str | None = None) -> list[dict]:
    timings = []
    for e in range(episodes):
        first, keyframes = episode_frames(policy.preset, seed0 + e, chunks)
        # synchronous, as the server resets a session without asynchronous execution
        policy.reset(PROMPT, seed=seed0 + e, operating_point=operating_point, synchronous=True)
        for k in range(chunks):
            t0 = time.perf_counter()
            actions = policy.act(first if k == 0 else None).actions
            t1 = time.perf_counter()
            policy.observe(keyframes[k], actions)
            timings.append({"act": t1 - t0, "observe": time.perf_counter() - t1, "chunk": k})
    return timings


@contextmanager
def connect(url: str) -> Iterator[Callable[[dict], dict]]:
    """A websocket connection to the server as `infer(message) -> reply`; a refusal raises."""
    with websockets.sync.client.connect(url, compression=None, max_size=None) as ws:
        unpackb(ws.recv())  # metadata

        def infer(msg: dict) -> dict:
            ws.send(packb(msg))
            reply = ws.recv()
            if isinstance(reply, str):
                raise RuntimeError(reply)
            return unpackb(reply)

        yield infer


def run_server(url: str, preset, episodes: int, chunks: int, seed0: int, operating_point: str | None = None
               ) -> list[dict]:
    timings = []
    with connect(url) as infer:
        for e in range(episodes):
            first, keyframes = episode_frames(preset, seed0 + e, chunks)
            reset = {"reset": True, "prompt": PROMPT, "seed": seed0 + e}
            infer(reset if operating_point is None else {**reset, "operating_point": operating_point})
            for k in range(chunks):
                t0 = time.perf_counter()
                actions = infer({"obs": first, "prompt": PROMPT})["action"]
                t1 = time.perf_counter()
                infer({"obs": keyframes[k], "compute_kv_cache": True, "state": actions})
                timings.append({"act": t1 - t0, "observe": time.perf_counter() - t1, "chunk": k})
    return timings


def summarize(timings: list[dict], warmup_chunks: int) -> dict:
    steady = [t for t in timings if t["chunk"] >= warmup_chunks]
    out: dict[str, Any] = {"chunks": len(steady)}
    for key in ("act", "observe"):
        values = sorted(t[key] for t in steady)
        out[key] = {"median_ms": 1e3 * statistics.median(values),
                    "p90_ms": 1e3 * values[min(len(values) - 1, int(0.9 * len(values)))]}
    totals = [t["act"] + t["observe"] for t in steady]
    out["chunk"] = {"median_ms": 1e3 * statistics.median(totals)}
    return out


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--fp8", action="store_true", help="FP8 block GEMMs (vaops serve --fp8)")
    parser.add_argument("--warm-sessions", type=int, default=1, help="sessions warmed up before ready")


def random_weights(args: argparse.Namespace):
    """Random weights of `args.preset` on `args.device` (FP8 block GEMMs with `args.fp8`); the text encoder, used
    only at reset, shrunk to one layer so that building the `robotwin` weights takes seconds."""
    preset = get_preset(args.preset)
    preset = preset.replace(text_encoder=dataclasses.replace(preset.text_encoder, num_layers=1, vocab_size=32128))
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    weights = build_random_weights(preset, seed=0, device=args.device, dtype=DTYPES[server_dtype(args)])
    print(f"built random {preset.name} weights on {args.device} ({server_dtype(args)}) in "
          f"{time.perf_counter() - t0:.1f} s")
    if getattr(args, "fp8", False):
        # before any policy is made (a direct one here, the agreement check's): the server's use_fp8 is then a no-op
        weights.use_fp8()
    return weights


def server_dtype(args: argparse.Namespace) -> str:
    return args.dtype or ("float32" if args.device == "cpu" else "bfloat16")


def serve_during(args: argparse.Namespace, weights, work: Callable[[str], None],
                 on_model: Callable[[Any], None] | None = None, **settings) -> None:
    """Serve `weights` (websocket only) in this thread while `work(websocket url)` runs in another
    once the server is ready; the server stops when the work ends. `settings`: ServeConfig fields;
    `on_model` is handed the served PolicyModel before the server starts."""
    cfg = ServeConfig(**{"model": "(in memory)", "http_port": free_port(), "grpc_port": free_port(),
                         "enable_grpc": False, "device": args.device, "dtype": server_dtype(args),
                         "max_sessions": max(2, args.warm_sessions), "fp8": args.fp8,
                         "warm_sessions": args.warm_sessions, **settings})
    failure: list[str] = []

    started = time.monotonic()

    def client() -> None:
        try:
            url = f"http://127.0.0.1:{cfg.http_port}"
            ready_by = time.monotonic() + 900  # the warm-up comes first (a minute per warmed session at most)
            while time.monotonic() < ready_by:
                try:
                    if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                        print(f"server ready {time.monotonic() - started:.1f} s after the weights were built "
                              f"({cfg.warm_sessions} session(s) warmed up)", flush=True)
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            work(f"ws://127.0.0.1:{cfg.http_port}")
        except Exception:
            failure.append(traceback.format_exc())
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # stops the server running in the main thread

    model = model_from_weights(cfg, weights)
    if on_model is not None:
        on_model(model)
    threading.Thread(target=client, daemon=True).start()
    serve(cfg, model)
    if failure:
        raise SystemExit(f"benchmark failed:\n{failure[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_arguments(parser)
    parser.add_argument("--episodes", type=int, default=6)
    parser.add_argument("--chunks", type=int, default=6, help="chunks per episode")
    parser.add_argument("--warmup-chunks", type=int, default=1, help="first chunks of each episode not timed")
    parser.add_argument("--operating-points", default="released",
                        help="comma-separated named sampling settings (released, paper, fast), each measured alike")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    points = args.operating_points.split(",")
    weights = random_weights(args)
    preset = weights.preset
    for point in points:
        preset.operating_point(point)  # an unknown name fails here, before the server starts
    timings: dict[str, tuple[list[dict], list[dict]]] = {p: ([], []) for p in points}

    # Kept across episodes, as the server keeps its first session. Not put through `Policy.warm_up` (every level of
    # an episode, about as long as the server's own warm-up on a GPU): the warm-up episode below, as long as the timed
    # ones, captures the graphs of every cache level they reach, after the server's warm-up compiled the blocks.
    policy = pooled_policy(weights, warm_up=False)

    def work(ws: str) -> None:
        for point in points:
            direct, served = timings[point]
            # warm-up: kernels, allocator, caches, and (direct) the graphs of each level the timed episodes reach
            run_direct(policy, 1, args.chunks, seed0=999, operating_point=point)
            run_server(ws, preset, 1, args.chunks, seed0=999, operating_point=point)
            for e in range(args.episodes):
                direct.extend(run_direct(policy, 1, args.chunks, seed0=e, operating_point=point))
                served.extend(run_server(ws, preset, 1, args.chunks, seed0=e, operating_point=point))

    serve_during(args, weights, work)
    result = {"preset": preset.name, "device": args.device, "dtype": server_dtype(args), "fp8": args.fp8,
              "rows": [overhead_row(point, *timings[point], args.warmup_chunks) for point in points]}
    for row in result["rows"]:
        print(f"\n{row['operating_point']}\n{'':10}{'direct':>14}{'server':>14}{'ratio':>10}")
        for key in ("act", "observe", "chunk"):
            d, s = row["direct"][key]["median_ms"], row["server"][key]["median_ms"]
            print(f"{key + ' ms':10}{d:14.2f}{s:14.2f}{s / d:10.3f}")
        print(f"server overhead per chunk: {100 * row['overhead']['chunk']:+.1f}% "
              f"(act alone {100 * row['overhead']['act']:+.1f}%; target <= 10%), "
              f"medians of {row['direct']['chunks']} chunks each")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def overhead_row(point: str, direct: list[dict], served: list[dict], warmup_chunks: int) -> dict:
    base, through = summarize(direct, warmup_chunks), summarize(served, warmup_chunks)
    return {"operating_point": point, "direct": base, "server": through,
            "overhead": {k: through[k]["median_ms"] / base[k]["median_ms"] - 1 for k in ("act", "chunk")}}


if __name__ == "__main__":
    main()
