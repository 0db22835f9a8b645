"""Plot `bench/serve_load.py`'s load rows: chunks served a second against the robots on one server, and the same as
a multiple of one robot's, batched and not, per operating point. With --realtime, its real-time rows instead: each
row's longest robot idle at each chunk index of the episode, against the 50 ms target. Runs here on the JSON the
device call returned (matplotlib need not be on the GPU node).

    python bench/plot_serve_load.py bench/results/serve_load_batched_default_paper_h200.json \
        bench/results/serve_load_batched_default_h200.json -o bench/results/serve_load_batched_default_h200.png
    python bench/plot_serve_load.py --realtime bench/results/serve_load_full_episodes_h200.json \
        -o bench/results/serve_load_full_episodes_h200.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Issue 18's target at the released settings: 8 robots serve at least twice one robot's chunks a second.
TARGET_X = 2.0
# What batching every pass of 8 robots allows at the released settings, by pass_batched_h200.md's per-robot pass
# costs: full caches to near-empty ones (bench/results/serve_load_batched_default_h200.md).
BOUND_X = (1.6, 1.85)
# Issue 18's real-time target: a robot's idle between chunks, p99, at most 50 ms.
TARGET_IDLE_S = 0.05


def load_rows(paths: list[Path]) -> list[dict]:
    """The load rows of every file, each with its file's index (rows of one server compare; rows of two do not)."""
    rows = []
    for i, path in enumerate(paths):
        for row in json.loads(path.read_text()).get("load", []):
            rows.append({**row, "run": i})
    if not rows:
        raise SystemExit(f"no load rows in {', '.join(map(str, paths))}")
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"paper": "tab:blue", "released": "tab:orange", "fast": "tab:green"}
    for (point, run, threads), group in _series(rows).items():
        batched = sorted((r for r in group if r["batching"]), key=lambda r: r["robots"])
        alone = next((r["chunks_per_s"] for r in batched if r["robots"] == 1), None)
        label = f"{point} (run {run + 1}, {threads} in flight)"
        colour = colours.get(point, "tab:gray")
        style = "-" if threads == min(r["compute_threads"] for r in rows) else "--"
        xs = [r["robots"] for r in batched]
        rate.plot(xs, [r["chunks_per_s"] for r in batched], style, marker="o", color=colour, label=label)
        for r in (r for r in group if not r["batching"]):
            rate.plot(r["robots"], r["chunks_per_s"], marker="o", mfc="none", color=colour, ls="none")
        if alone and len(xs) > 1:
            ratio.plot(xs, [r["chunks_per_s"] / alone for r in batched], style, marker="o", color=colour, label=label)
    rate.set(xlabel="robots on one server", ylabel="chunks served a second", xscale="log", xticks=[1, 2, 4, 8],
             xticklabels=["1", "2", "4", "8"], title="throughput (hollow: batching off, same server)")
    ratio.axhline(TARGET_X, color="black", lw=0.8, ls=":", label="issue 18's target, released settings")
    ratio.axhspan(*BOUND_X, color="tab:orange", alpha=0.12, label="released, every pass batched (estimate)")
    ratio.set(xlabel="robots on one server", ylabel="x one robot's rate", xscale="log", xticks=[1, 2, 4, 8],
              xticklabels=["1", "2", "4", "8"], title="throughput against one robot's, batched")
    for ax in (rate, ratio):
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def realtime_rows(paths: list[Path]) -> list[dict]:
    """The real-time rows of every file that record the longest idle at each chunk index, each with its file's index."""
    rows = [{**row, "run": i} for i, path in enumerate(paths)
            for row in json.loads(path.read_text()).get("realtime", []) if row.get("idle_max_by_chunk_s")]
    if not rows:
        raise SystemExit(f"no real-time rows with idle_max_by_chunk_s in {', '.join(map(str, paths))}")
    return rows


def plot_realtime(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    counts = sorted({r["robots"] for r in rows})
    colours = {n: plt.get_cmap("tab10")(i) for i, n in enumerate(counts)}
    for r in sorted(rows, key=lambda r: (r["robots"], r["run"])):
        chunks = sorted(r["idle_max_by_chunk_s"].items(), key=lambda kv: int(kv[0]))
        met = "met" if r["idle_p99_s"] <= TARGET_IDLE_S else "not met"
        label = (f"{r['robots']} robots, {'spread' if r.get('staggered') else 'together'} (run {r['run'] + 1}): "
                 f"p99 {r['idle_p99_s'] * 1e3:.0f} ms, {met}")
        ax.plot([int(k) for k, _ in chunks], [v for _, v in chunks], marker=".", lw=1,
                color=colours[r["robots"]], ls="--" if r.get("staggered") else "-", label=label)
    ax.axhline(TARGET_IDLE_S, color="black", lw=0.8, ls=":", label="issue 18's target (p99)")
    point = rows[0]["operating_point"]
    ax.set(xlabel="chunk of the episode", ylabel="longest robot idle before it, s", yscale="log",
           title=f"robots at 50 Hz on one server, {point} operating point: idle as the KV caches fill")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _series(rows: list[dict]) -> dict[tuple, list[dict]]:
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r["operating_point"], r["run"], r["compute_threads"]), []).append(r)
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="serve_load.json files")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--realtime", action="store_true", help="plot the real-time rows' idle by chunk index")
    args = parser.parse_args()
    if args.realtime:
        plot_realtime(realtime_rows(args.json), args.out)
    else:
        plot(load_rows(args.json), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
