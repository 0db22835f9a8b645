"""A policy that works: LingBot-VA `small`, trained from scratch on the ALOHA sim demonstrations,
evaluated in closed loop on held-out seeds through the KServe policy server.

Every step runs the project's own stage commands (`vaops demos / validate / clean / augment /
encode / train / serve / eval`) on folders under `--work`, so each can run on the machine that
suits it and resume there:

    python bench/policy_aloha.py demos    # scripted demos, both tasks (renders as the evaluation will)
    python bench/policy_aloha.py data     # validate -> clean -> augment -> encode (the small random VAE)
    python bench/policy_aloha.py train    # vaops train --recipe small, from scratch        [GPU]
    python bench/policy_aloha.py eval --variants sync async grounded v3a10 v2a4          [GPU]
    python bench/policy_aloha.py report   # bench/results/policy_aloha.{md,json}, loss plot, videos

On the lab's GPU nodes a call carries 64 MiB and a warm node is not promised between calls, so data and
training go in two self-contained calls: `data` then `pack-data --dest $OUT` (what training reads, in
15 MiB parts: 22 MB for 160 demos a task), and `unpack-data --source <those files>` before `train`,
carried with the training wheels. `pack` / `unpack` bring the trained checkpoint back the same way.

An evaluation variant serves one checkpoint (`vaops serve`), runs `--eval-workers` evaluation
shards against it at once (`vaops eval --shard i/n`: one sim per process) and merges them:
`sync` (the released sampling: video 25 / action 50 steps), `async` (the next chunk computed while
the robot executes, robot paced in real time), `grounded` (the same, the executing chunk's video
re-imagined first), `v3a10` and `v2a4` (fewer denoising steps, the same checkpoint and seeds). Seeds: demos 0, 1, ...; evaluation 10000 + episode, never trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAOPS = [sys.executable, "-c", "import sys; from vaops.pipelines.cli import main; sys.exit(main())"]
TASKS = ("AlohaTransferCube-v0", "AlohaInsertion-v0")
# name -> (policy.json sampling overrides, eval flags)
VARIANTS: dict[str, tuple[dict, list[str]]] = {
    "sync": ({}, []),
    "async": ({}, ["--async-execution", "--real-time"]),
    # the paper's grounded async (section 3.4): the executing chunk's video re-imagined from the latest
    # observation and its actions before the next chunk is predicted; pays with the forward-dynamics loss
    "grounded": ({}, ["--async-execution", "grounded", "--real-time"]),
    "sync-rt": ({}, ["--real-time"]),  # the synchronous baseline of `async`: same pacing
    "v3a10": ({"video_steps": 3, "action_steps": 10}, []),
    "v2a4": ({"video_steps": 2, "action_steps": 4}, []),
    # the paper's deployment: 3 video steps stopped at s = 0.6 (noise 0.4), 10 action steps
    "paper": ({"video_steps": 3, "video_stop": 0.4, "action_steps": 10}, []),
}
Z95 = 1.959963984540054
# The steps the GPU-time target counts: demos, the data stages and training ("data": older runs).
PIPELINE_STEPS = ("demos", "data", "validate", "clean", "augment", "encode", "train")


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class Timings:
    """Wall seconds per step (and whether it held the GPU), kept in the work folder across launches."""

    def __init__(self, work: Path):
        self.path = work / "timings.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def record(self, step: str, seconds: float, gpu: bool, **extra) -> None:
        # re-read first: an evaluation running beside another records into the same file
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data[step] = {"seconds": round(seconds, 1), "gpu": gpu, **extra}
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def vaops(*args: str, log: Path | None = None, env: dict | None = None) -> None:
    cmd = [*VAOPS, *args]
    print("+ vaops " + " ".join(args), flush=True)
    out = open(log, "a") if log else None
    try:
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out,
                       stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()


def timed(timings: Timings, step: str, gpu: bool, fn, **extra) -> None:
    start = time.perf_counter()
    fn()
    timings.record(step, time.perf_counter() - start, gpu, cpu_cores=os.cpu_count(), **extra)


# ----- steps -----

def demos(a: argparse.Namespace) -> None:
    w = a.work
    if (w / "demos" / "meta" / "info.json").is_file():
        print(f"demos: already done ({w / 'demos'})")
        return
    timed(Timings(w), "demos", a.on_gpu, lambda: vaops(
        "demos", "--preset", "small", "--output", str(w / "demos"), "--episodes", str(a.episodes),
        # the expert solves most seeds; twice the episodes leaves room (held-out seeds start at 10000)
        "--max-attempts", str(2 * a.episodes), "--workers", str(a.workers)), episodes_per_task=a.episodes)


def data(a: argparse.Namespace) -> None:
    """validate -> clean -> augment -> encode, each timed on its own; a stage whose output is there
    is skipped (the stages write atomically), so a launch cut short resumes at the next stage."""
    w = a.work
    reports = w / "reports"
    workers = ["--workers", str(a.workers)]
    stages = [
        ("validate", reports / "validate" / "report.json", lambda: vaops(
            "validate", "--preset", "aloha", "--dataset", str(w / "demos"), "--report-dir", str(reports / "validate"))),
        ("clean", w / "clean" / "meta" / "info.json", lambda: vaops(
            "clean", "--preset", "aloha-full", "--vcodec", "h264", *workers, "--dataset", str(w / "demos"),
            "--output", str(w / "clean"), "--report-dir", str(reports / "clean"),
            "--validation-report", str(reports / "validate"))),
        # No copies: the sim evaluates in the demos' own lighting, and the latents must travel to the GPU.
        ("augment", w / "augmented" / "meta" / "info.json", lambda: vaops(
            "augment", "--preset", "photometric", "--copies", "0", *workers, "--dataset", str(w / "clean"),
            "--output", str(w / "augmented"), "--report-dir", str(reports / "augment"))),
        ("encode", reports / "encode" / "report.json", lambda: vaops(
            "encode", "--model-preset", "small", "--dataset", str(w / "augmented"), "--output", str(w / "encoded"),
            "--report-dir", str(reports / "encode"), "--checkpoint", str(base_checkpoint(w, a.device)),
            "--device", a.device, "--dtype", "float32")),
    ]
    for name, done, fn in stages:
        if done.is_file():
            print(f"{name}: already done ({done})")
            continue
        timed(Timings(w), name, a.on_gpu, fn)


def base_checkpoint(work: Path, device: str = "cpu") -> Path:
    """The random `small` checkpoint training starts from (the preset's seed, which bench/vae_probe.py
    chose); its VAE's latent statistics are fitted on the demos (`base_stats.json`) and its VAE and
    text encoder encode the data.

    `base.json` keeps the hashes of the encoders the data was encoded with, so a machine that
    rebuilds them (training elsewhere, from base_stats.json) proves it got the same weights."""
    from vaops.models.checkpoint import file_sha256, write_random_checkpoint
    from vaops.models.config import get_preset
    from vaops.models.vae import load_vae, save_vae

    folder = work / "base"
    if not folder.is_dir():
        stats_file = work / "base_stats.json"
        write_random_checkpoint(folder, "small")
        vae = load_vae(folder / "vae", device=device)
        if stats_file.is_file():
            stats = json.loads(stats_file.read_text())
            vae.register_to_config(latents_mean=stats["latents_mean"], latents_std=stats["latents_std"])
        else:  # reads the demos with lerobot, which a training node need not have
            from vaops.components.encode.calibrate import calibrate_vae

            stats = calibrate_vae(vae, work / "demos", get_preset("small"))
            stats_file.write_text(json.dumps(stats, indent=2) + "\n")
        save_vae(vae.cpu(), folder / "vae")
    # Weights only: the configs come from the preset's code, and their JSON differs with the library
    # versions that wrote them (diffusers, transformers, tokenizers differ between a laptop and a node).
    hashes = {p.relative_to(folder).as_posix(): file_sha256(p)
              for part in ("vae", "text_encoder") for p in sorted((folder / part).glob("*.safetensors"))}
    record = work / "base.json"
    if record.is_file():
        expected = json.loads(record.read_text())
        differ = sorted(k for k in expected.keys() | hashes.keys() if expected.get(k) != hashes.get(k))
        if differ:
            raise SystemExit(f"{folder}: encoders differ from those in {record} ({differ}); the latents were "
                             f"made with other weights")
    else:
        record.write_text(json.dumps(hashes, indent=2) + "\n")
    return folder


def train(a: argparse.Namespace) -> None:
    """`vaops train --recipe small`; `--fit-min M` sizes the run (its cosine schedule) to M minutes of
    this machine from a measured step rate, and later launches resume that same run."""
    w = a.work
    args = ["train", "--recipe", "small", "--dataset", str(w / "encoded"), "--init-from", str(base_checkpoint(w)),
            *shlex.split(a.train_args)]
    timings = Timings(w)
    before = timings.data.get("train", {}).get("seconds", 0.0) if (w / "train").is_dir() else 0.0
    start = time.perf_counter()  # the probe's minutes count as training time
    plan = w / "train_plan.json"
    steps = a.steps
    if plan.is_file():
        steps = json.loads(plan.read_text())["steps"]
    elif a.fit_min:
        rate = measured_rate(w, args)
        steps = int(rate * 60 * a.fit_min)
        plan.write_text(json.dumps({"steps": steps, "steps_per_s": round(rate, 3), "fit_min": a.fit_min}) + "\n")
        print(f"{rate:.2f} steps/s measured: {steps} steps fit {a.fit_min} min")
    args += ["--output", str(w / "train"), "--experiment", "policy-aloha"]
    if steps:
        args += ["--steps", str(steps)]
    if a.time_limit_min:
        args += ["--time-limit-min", str(a.time_limit_min)]
    vaops(*args, env=_file_store(tracking_uri(w)))
    timings.record("train", before + time.perf_counter() - start, a.on_gpu)


def _file_store(uri: str) -> dict:
    # A file store in the work folder: it travels with the results, and needs only mlflow-skinny.
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true"}


def measured_rate(work: Path, args: list[str], probe_steps: int = 40) -> float:
    """Optimizer steps per second of the recipe here: a short run in a scratch folder, the median
    step time after the first 10 steps (compilation and loader start-up excluded)."""
    scratch = work / "probe"
    shutil.rmtree(scratch, ignore_errors=True)
    vaops(*args, "--output", str(scratch / "run"), "--experiment", "probe", "--steps", str(probe_steps),
          log=work / "probe.log", env=_file_store((scratch / "mlruns").absolute().as_uri()))
    found = sorted(scratch.glob("mlruns/*/*/metrics/step_time_s"))
    times = [t for step, t in sorted(read_metric(found[-1]).items()) if step > 10] if found else []
    shutil.rmtree(scratch, ignore_errors=True)
    median = _median(times)
    if median is None:
        raise SystemExit(f"probe run logged no step times; see {work / 'probe.log'}")
    return 1.0 / median


def tracking_uri(work: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (work / "mlruns").absolute().as_uri()


def trained_checkpoint(work: Path) -> Path:
    outputs = work / "train" / "outputs.json"
    if outputs.is_file():  # written where it trained: the same folder name under this work folder
        return work / "train" / "checkpoints" / Path(json.loads(outputs.read_text())["checkpoint"]).name
    found = sorted((work / "train").glob("checkpoints/step-*"))
    if not found:
        raise SystemExit(f"{work / 'train'}: no checkpoint yet; run the train step first")
    return found[-1]


def variant_checkpoint(work: Path, name: str) -> Path:
    """The trained checkpoint with the variant's sampling in its policy.json (weights linked, not copied)."""
    ckpt = trained_checkpoint(work)
    overrides, _ = VARIANTS[name]
    if not overrides:
        return ckpt
    folder = work / "variants" / name
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(ckpt, folder, copy_function=os.link, ignore=shutil.ignore_patterns("engine", "trainer_state*"))
    policy = json.loads((ckpt / "policy.json").read_text())
    policy["sampling"].update(overrides)
    (folder / "policy.json").unlink()
    (folder / "policy.json").write_text(json.dumps(policy, indent=2) + "\n")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(proc: subprocess.Popen, port: int, log: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"policy server exited ({proc.returncode}); see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"policy server not up after {timeout_s} s; see {log}")


def evaluate(a: argparse.Namespace) -> None:
    w = a.work
    timings = Timings(w)
    for name in a.variants:
        out = w / "eval" / name
        if (out / "metrics.json").is_file():
            print(f"{name}: already evaluated ({out})")
            continue
        start = time.perf_counter()
        _evaluate_variant(a, name, out)
        timings.record(f"eval-{name}", time.perf_counter() - start, a.on_gpu, episodes_per_task=a.eval_episodes)


def _evaluate_variant(a: argparse.Namespace, name: str, out: Path) -> None:
    w = a.work
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = out / "policy_server.log"
    server = subprocess.Popen(
        [*VAOPS, "serve", "--model", str(variant_checkpoint(w, name)), "--device", a.device, "--http-port", str(port),
         "--no-grpc", "--max-sessions", str(2 * a.eval_workers), "--dtype", a.dtype],
        cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        _wait_for_server(server, port, log)
        _, flags = VARIANTS[name]
        shards = []
        for i in range(a.eval_workers):
            cmd = [*VAOPS, "eval", "--preset", "aloha", "--output", str(out), "--policy-url", f"ws://127.0.0.1:{port}",
                   "--episodes", str(a.eval_episodes), "--max-steps", str(a.max_steps),
                   "--shard", f"{i}/{a.eval_workers}", "--tasks", *a.tasks, "--no-mlflow", *flags]
            shard_log = open(out / f"shard-{i}.log", "w")
            shards.append((subprocess.Popen(cmd, cwd=ROOT, stdout=shard_log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"}), shard_log))
        failed = []
        for i, (proc, shard_log) in enumerate(shards):
            if proc.wait() != 0:
                failed.append(i)
            shard_log.close()
        if failed:
            raise SystemExit(f"{name}: evaluation shards {failed} failed; see {out}/shard-*.log")
        vaops("eval", "--merge", str(out), "--no-mlflow")
    finally:
        server.send_signal(signal.SIGINT)  # at once: SIGTERM lets the episodes under way finish first
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


# ----- report -----

def _episodes(folder: Path) -> list[dict]:
    path = folder / "episodes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def summarize_variant(folder: Path) -> dict:
    rows = _episodes(folder)
    per_task = {}
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        wins = sum(bool(r["success"]) for r in mine)
        lo, hi = wilson(wins, len(mine))
        seeds = sorted(r["seed"] for r in mine)
        per_task[task] = {
            "episodes": len(mine), "successes": wins, "success_rate": wins / len(mine) if mine else None,
            "wilson95": [round(lo, 3), round(hi, 3)], "seeds": [seeds[0], seeds[-1]] if seeds else None,
            "task_wall_s_median": _median([r["wall_s"] for r in mine if r["success"]]),
            "chunk_latency_s_median": _median([x for r in mine for x in r["chunk_latency_s"]]),
            "idle_s_median": _median([x for r in mine for x in r.get("idle_s", [])]),
            "errors": sum(r["status"] == "error" for r in mine),
        }
    return per_task


def read_metric(path: Path) -> dict[int, float]:
    """step -> value of one metric file of an MLflow file store (lines `timestamp value step`)."""
    out = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        _, value, step = line.split()[:3]
        out[int(step)] = float(value)
    return out


def loss_history(work: Path) -> list[tuple[int, float, float, float]]:
    """(step, loss, video_loss, action_loss) from the run's MLflow file store."""
    runs = sorted((work / "mlruns").glob("*/*/metrics/loss"))
    if not runs:
        return []
    metrics = runs[-1].parent
    loss, video, action = (read_metric(metrics / name) for name in ("loss", "video_loss", "action_loss"))
    return [(s, loss[s], video.get(s, math.nan), action.get(s, math.nan)) for s in sorted(loss)]


def plot_losses(history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.array([h[0] for h in history])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, label in ((1, "total"), (2, "video"), (3, "action")):
        y = np.array([h[k] for h in history])
        window = max(1, len(y) // 100)
        smooth = np.convolve(y, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss (smoothed)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(a: argparse.Namespace) -> None:
    w, results = a.work, ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    timings = Timings(w).data
    variants = {v: summarize_variant(w / "eval" / v) for v in VARIANTS if (w / "eval" / v / "episodes.jsonl").is_file()}
    history = loss_history(w)
    if history:
        plot_losses(history, results / "policy_aloha_loss.png")
    videos = copy_videos(w, results)
    state = json.loads((trained_checkpoint(w) / "trainer_state.json").read_text()) if (
        trained_checkpoint(w) / "trainer_state.json").is_file() else {}
    steps = history[-1][0] if history else state.get("step")
    summary = {"variants": variants, "timings": timings, "train_steps": steps,
               "final_loss": history[-1][1] if history else None, "videos": videos, "command": a.commands}
    (results / "policy_aloha.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / "policy_aloha.md").write_text(markdown(summary))
    print(f"wrote {results / 'policy_aloha.md'}")


def copy_videos(work: Path, results: Path) -> dict:
    """One success and one failure of the synchronous evaluation, per task where there is one."""
    chosen = {}
    folder = work / "eval" / "sync"
    for row in _pick_videos([r for r in _episodes(folder) if r.get("video") and (folder / r["video"]).is_file()]):
        src = folder / row["video"]
        if src.is_file():
            dst = results / f"policy_aloha_{row['task'].split('-')[0]}_{row['status']}{src.suffix}"
            shutil.copyfile(src, dst)
            chosen[f"{row['task']} {row['status']}"] = {"file": dst.name, "seed": row["seed"]}
    return chosen


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def markdown(s: dict) -> str:
    t = s["timings"]
    gpu_s = sum(v["seconds"] for k, v in t.items() if v.get("gpu") and k in PIPELINE_STEPS)
    lines = ["# A policy that works: LingBot-VA `small` on the ALOHA sim", "",
             "Trained from scratch (random init, no base checkpoint) on scripted demonstrations of both tasks, "
             "evaluated in closed loop through the KServe policy server (upstream websocket protocol) on "
             "held-out seeds (10000 + episode; demonstrations use seeds 0, 1, ...). Made by "
             "`bench/policy_aloha.py`; the commands are listed at the end.", ""]
    lines += ["## Success rate (95% Wilson interval)", "",
              "| variant | task | successes / episodes | success | 95% interval | median task time (s) | "
              "median chunk round trip (s) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, tasks in s["variants"].items():
        for task, r in tasks.items():
            lo, hi = r["wilson95"]
            wall = "–" if r["task_wall_s_median"] is None else f"{r['task_wall_s_median']:.2f}"
            lat = "–" if r["chunk_latency_s_median"] is None else f"{r['chunk_latency_s_median']:.3f}"
            lines.append(f"| {name} | {task} | {r['successes']} / {r['episodes']} | {_pct(r['success_rate'])} | "
                         f"{_pct(lo)} - {_pct(hi)} | {wall} | {lat} |")
    lines += ["", "Variants: " + "; ".join(f"`{k}` {describe(k)}" for k in s["variants"]), ""]
    gpu_steps = ", ".join(f"{k} {v['seconds'] / 60:.1f} min" for k, v in t.items() if v.get("gpu") and k in PIPELINE_STEPS)
    all_steps = ", ".join(f"{k} {v['seconds']:.0f} s ({'GPU node' if v.get('gpu') else 'CPU'})" for k, v in t.items())
    lines += ["## Training", "", f"- optimizer steps: {s['train_steps']}; final loss {s['final_loss']}",
              f"- GPU-node time for demos, data and training: {gpu_s / 60:.1f} min ({gpu_steps})",
              f"- every step: {all_steps}", "", "![loss curves](policy_aloha_loss.png)", ""]
    if s["videos"]:
        lines += ["## Videos (real camera | imagined)", ""]
        lines += [f"- {k} (seed {v['seed']}): ![{k}]({v['file']})" for k, v in s["videos"].items()]
        lines.append("")
    notes = ROOT / "bench" / "results" / "policy_aloha_notes.md"
    if notes.is_file():  # what the numbers mean, written by whoever ran it
        lines += [notes.read_text().strip(), ""]
    lines += ["## Commands", "", "```", *s["command"], "```", ""]
    return "\n".join(lines)


def describe(name: str) -> str:
    overrides, flags = VARIANTS[name]
    parts = [f"{k}={v}" for k, v in overrides.items()] or ["released sampling (video 25 / action 50)"]
    return ", ".join(parts + flags)


# ----- moving results off a leased machine (at most 8 files of 16 MB come back) -----

SHARD_BYTES = 15 * 2**20


def pack(a: argparse.Namespace) -> None:
    """`--dest`: results.tar.gz (timings, reports, eval episodes and metrics, two videos per variant,
    MLflow metrics, the trained checkpoint's small files) and its transformer in 15 MB shards."""
    import tarfile

    from vaops.components.train.checkpointing import ENGINE_STATE
    from vaops.models.transformer import load_transformer, save_transformer

    w, dest = a.work, Path(a.dest)
    dest.mkdir(parents=True, exist_ok=True)
    ckpt = trained_checkpoint(w)
    model = load_transformer(ckpt / "transformer", dtype=_stored_dtype(ckpt / "transformer"))
    save_transformer(model, dest / "transformer", max_shard_bytes=SHARD_BYTES)
    keep_videos = {r["video"] for v in (w / "eval").glob("*") for r in _pick_videos(_episodes(v))}

    def wanted(info: tarfile.TarInfo):
        name = info.name
        if info.isdir():  # a folder left out would take the chosen videos inside it along
            return info
        if "/videos/" in name and not any(name.endswith(v) for v in keep_videos):
            return None
        if name.endswith(".safetensors"):  # the transformer travels in shards; the encoders are rebuilt
            return None
        if f"/{ENGINE_STATE}/" in name or name.endswith("policy_server.log") or "/variants/" in name:
            return None  # optimizer state (290 MB a checkpoint), server logs, linked variant folders
        return info

    with tarfile.open(dest / "results.tar.gz", "w:gz") as tar:
        for part in ("timings.json", "base.json", "base_stats.json", "reports", "eval", "mlruns", "train"):
            if (w / part).exists():
                tar.add(w / part, arcname=part, filter=wanted)
    print(f"packed {ckpt} into {dest}")


# What `train` reads from a work folder: the latents and their dataset (not its videos), the encoders' record.
TRAINING_INPUTS = ("encoded", "base_stats.json", "base.json", "timings.json", "reports")
DATA_PARTS = "data.tgz.part-"


def pack_data(a: argparse.Namespace) -> None:
    """`--dest`: the training inputs as a gzipped tar in SHARD_BYTES parts (a call returns files of at most
    16 MiB); the encoded dataset's videos stay behind (training reads the latents)."""
    import tarfile

    w, dest = a.work, Path(a.dest)
    dest.mkdir(parents=True, exist_ok=True)
    whole = dest / "data.tgz"
    with tarfile.open(whole, "w:gz", compresslevel=1) as tar:  # bf16 latents barely compress
        for part in TRAINING_INPUTS:
            if (w / part).exists():
                tar.add(w / part, arcname=part, filter=lambda i: None if i.name.startswith("encoded/videos") else i)
    with open(whole, "rb") as f:
        for k, chunk in enumerate(iter(lambda: f.read(SHARD_BYTES), b"")):
            (dest / f"{DATA_PARTS}{k:03d}").write_bytes(chunk)
    whole.unlink()
    print(f"packed the training inputs of {w} into {dest}/{DATA_PARTS}*")


def unpack_data(a: argparse.Namespace) -> None:
    """Rebuild a work folder's training inputs from `pack-data`'s parts (`--source`)."""
    import io
    import tarfile

    parts = sorted(Path(a.source).glob(f"{DATA_PARTS}*"))
    if not parts:
        raise SystemExit(f"{a.source}: no {DATA_PARTS}* files (made by `pack-data`)")
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in parts)), mode="r:gz") as tar:
        tar.extractall(a.work, filter="data")
    print(f"unpacked {len(parts)} part(s) into {a.work}")


def _stored_dtype(folder: Path):
    import torch
    from safetensors import safe_open

    first = next(iter(sorted(folder.glob("*.safetensors"))))
    with safe_open(str(first), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("ffn.net.0.proj.weight"))
        return torch.bfloat16 if f.get_slice(key).get_dtype() == "BF16" else torch.float32


def _pick_videos(rows: list[dict]) -> list[dict]:
    out = []
    for task in TASKS:
        for status in ("success", "failure"):
            row = next((r for r in rows if r["task"] == task and r["status"] == status and r.get("video")), None)
            if row:
                out.append(row)
    return out


def unpack(a: argparse.Namespace) -> None:
    """Rebuild the work folder from `pack`'s files: results, and the trained checkpoint as the base's
    encoders (checked against base.json) plus the trained transformer and policy.json."""
    import tarfile

    src, w = Path(a.source), a.work
    with tarfile.open(src / "results.tar.gz") as tar:
        tar.extractall(w, filter="data")
    ckpt = trained_checkpoint(w)
    base = base_checkpoint(w)
    shutil.rmtree(ckpt / "transformer", ignore_errors=True)
    shutil.copytree(src / "transformer", ckpt / "transformer")
    for part in ("vae", "text_encoder", "tokenizer"):  # their weights stayed behind (rebuilt, hash-checked)
        shutil.copytree(base / part, ckpt / part, dirs_exist_ok=True)
    print(f"unpacked into {w}; trained checkpoint {ckpt}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["demos", "data", "pack-data", "unpack-data", "train", "eval", "report", "pack",
                                    "unpack"])
    p.add_argument("--dest", default=os.environ.get("OUT", "."), help="pack, pack-data: folder to write")
    p.add_argument("--source", help="unpack, unpack-data: folder of pack's or pack-data's files")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "policy_aloha")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--episodes", type=int, default=100, help="demonstrations per task")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="demo rollout processes, and dataset writers of demos, clean and augment")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: the recipe's)")
    p.add_argument("--train-args", default="", help="train: more `vaops train` flags, e.g. "
                   "'--forward-dynamics-prob 0.5' (the recipe with the forward-dynamics loss)")
    p.add_argument("--time-limit-min", type=float, default=0, help="this launch's training budget (resumable)")
    p.add_argument("--fit-min", type=float, default=0, help="train: size the run to this many minutes here")
    p.add_argument("--variants", nargs="+", default=["sync"], choices=sorted(VARIANTS))
    p.add_argument("--eval-episodes", type=int, default=50, help="per task")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="eval: the tasks to evaluate")
    p.add_argument("--eval-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--max-steps", type=int, default=100, help="actions per evaluation episode (10 s at 10 fps)")
    p.add_argument("--commands", nargs="*", default=[], help="report: the command lines that made the results")
    a = p.parse_args(argv)
    a.work = a.work.absolute()
    a.work.mkdir(parents=True, exist_ok=True)
    a.on_gpu = a.device.startswith("cuda")
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = {"demos": demos, "data": data, "pack-data": pack_data, "unpack-data": unpack_data, "train": train,
             "eval": evaluate, "report": report, "pack": pack, "unpack": unpack}
    steps[a.step](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
