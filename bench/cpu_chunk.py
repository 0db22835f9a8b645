"""A policy's chunk on a CPU, as a laptop's closed loop runs it: act, observe (the VAE encodes the keyframes)
and imagine (the VAE decodes the predicted video), with models/vae.py's oneDNN 3D convolutions on and off
in the same run, alternating chunk by chunk.

    python bench/cpu_chunk.py --out bench/results/cpu_chunk       # the shipped policy, paper's operating point
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import vaops.models.vae as vae_module
from vaops.models.checkpoint import load_weights
from vaops.models.model_source import resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "small-aloha"))
    p.add_argument("--operating-point", default="paper")
    p.add_argument("--chunks", type=int, default=6, help="timed chunks per setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    policy = load_weights(resolve_checkpoint(args.checkpoint)).new_policy()
    preset = policy.preset
    rng = np.random.default_rng(0)
    image = {c.key: rng.integers(0, 255, (c.height, c.width, 3), dtype=np.uint8) for c in preset.cameras}
    keyframes = [image] * (preset.frame_chunk_size * preset.frames_per_latent)
    times: dict[bool, dict[str, list[float]]] = {on: {"act": [], "observe": [], "imagine": []} for on in (True, False)}
    policy.reset("Transfer the red cube from the right arm to the left arm.", seed=0,
                 operating_point=args.operating_point, synchronous=True)
    chunk = policy.act(image)
    policy.observe(keyframes[preset.frames_per_latent:], chunk.actions)
    for k in range(2 * args.chunks + 2):  # the first two (one per setting) are not timed
        on = k % 2 == 0
        vae_module.ONEDNN_CPU_CONV3D = on
        t0 = time.perf_counter()
        chunk = policy.act()
        t1 = time.perf_counter()
        policy.observe(keyframes, chunk.actions)
        t2 = time.perf_counter()
        policy.imagine(chunk.latents)
        t3 = time.perf_counter()
        if k >= 2:
            for name, s in (("act", t1 - t0), ("observe", t2 - t1), ("imagine", t3 - t2)):
                times[on][name].append(s)
    vae_module.ONEDNN_CPU_CONV3D = True
    med = {on: {name: statistics.median(v) for name, v in parts.items()} for on, parts in times.items()}
    shown = Path(args.checkpoint).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    lines = [f"# A policy's chunk on a CPU ({args.threads} threads), oneDNN 3D convolutions on and off", "",
             f"`{shown}`, operating point {args.operating_point}, {args.chunks} chunks per setting "
             "(alternating), medians in seconds:", "",
             "| VAE convolutions | act | observe | imagine | act + observe |", "| --- | ---: | ---: | ---: | ---: |"]
    for on, label in ((False, "PyTorch's choice"), (True, "oneDNN (models/vae.py)")):
        m = med[on]
        lines.append(f"| {label} | {m['act']:.3f} | {m['observe']:.3f} | {m['imagine']:.3f} | "
                     f"{m['act'] + m['observe']:.3f} |")
    speedup = (med[False]["act"] + med[False]["observe"]) / (med[True]["act"] + med[True]["observe"])
    lines += ["", f"act + observe: {speedup:.2f}x faster with oneDNN in this run."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"checkpoint": args.checkpoint, "operating_point": args.operating_point, "threads": args.threads,
             "seconds": {("onednn" if on else "pytorch"): v for on, v in times.items()},
             "median_s": {("onednn" if on else "pytorch"): v for on, v in med.items()},
             "act_plus_observe_speedup": speedup}, indent=1) + "\n")


if __name__ == "__main__":
    main()
