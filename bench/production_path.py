"""Dress rehearsal of the production path: a base checkpoint in the released layout and a
RoboTwin-shaped LeRobot dataset -> validate, clean, encode -> post-train on 1..N GPUs -> register in
MLflow -> serve from the registry -> one episode over the upstream websocket protocol.

Every step is the project's own entry point in its own process (the stage CLIs the pipeline's
steps call, training as `torchrun --nproc-per-node N -m vaops.pipelines.cli train`, `vaops
serve` from `models:/NAME/VERSION`), so each step's wall time and peak GPU memory (nvidia-smi,
every GPU, sampled every 100 ms) are its own. At the end the served model's first chunk is
compared with the trained checkpoint's first chunk run directly (same prompt, seed, images).

    # on this CPU machine: tiny networks on RoboTwin-shaped data, one process, a few minutes
    python bench/production_path.py --preset tiny --device cpu --out outputs/rehearsal-cpu
    # on 2 x H200: robotwin sizes (5 B transformer, real-size Wan2.2 VAE and UMT5-XXL), random weights;
    # as run there (bench/results/production_path.md), one process per 10-minute device call:
    python bench/production_path.py --preset robotwin --device cuda --gpus 1,2 --all-stages --out /tmp/rehearsal \\
        --stop-after encode                                # wheels: .whl-rdata (bench/device_wheels.sh)
    python bench/production_path.py ... --resume --deadline-s 330 \\
        --results-md bench/results/production_path.md     # wheels: .whl-rgpu; again until it ends

Writes <out>/production_path.json and <out>/production_path.md (the command line beside the
numbers), each step's log under <out>/logs/. The rehearsal can be split over several processes (a
GPU lease runs at most 10 minutes a command): `--deadline-s S` starts no step after S seconds and
exits 3 with the steps done so far in <out>/progress.json; the same command with `--resume` skips
them and goes on. Every process's command line is recorded. The `tiny` mode keeps the RoboTwin data layout (three
cameras with the released names at 240x320, 16 end-effector actions, tshape latents) with the tiny
networks, so the code path the GPU run takes is the one proven here.

Why not `vaops run`: the pipeline always evaluates in closed loop before it registers, and a
robotwin-preset model is evaluated in RoboTwin 2.0 (SAPIEN, cuRobo, its assets), which a
rehearsal machine does not have.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

# Before torch or NCCL start anywhere (the children inherit it): NVLink multicast stays off on
# shared hosts.
for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1"), ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_key, _value)

ROBOTWIN_CAMERAS = ("observation.images.cam_high", "observation.images.cam_left_wrist",
                    "observation.images.cam_right_wrist")
FRAME_HW = (240, 320)  # RoboTwin's D435 cameras
# The released action layout (16): per arm the end effector's xyz and quaternion (xyzw), then the gripper.
EEF_NAMES = [f"{arm}_{n}" for arm in ("left", "right") for n in ("x", "y", "z", "qx", "qy", "qz", "qw", "gripper")]
TASKS = ("stack the red block on the blue pad", "lift the red block with both arms", "push the red block to the left")
PROMPT = TASKS[0]
SHARD_BYTES = {"tiny": 256 * 1024, "robotwin": 5 * 2**30}  # the tiny one small enough to shard too
GIB = 2**30


# ----- measurement -----

class GpuMemory:
    """Used memory of every GPU, sampled by nvidia-smi in the background (all processes count: the
    steps are child processes); none on a machine without nvidia-smi."""

    def __init__(self, period_ms: int = 100):
        self.samples: list[tuple[float, int, float]] = []  # (monotonic s, gpu, GiB)
        self.proc: subprocess.Popen[str] | None = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits",
                                          f"-lms={period_ms}"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            try:
                index, used = (int(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.monotonic(), index, used / 1024))

    def peak(self, t0: float, t1: float) -> dict[str, float] | None:
        if self.proc is None:
            return None
        peaks: dict[str, float] = {}
        for t, gpu, gib in list(self.samples):
            if t0 <= t <= t1:
                peaks[f"gpu{gpu}"] = round(max(peaks.get(f"gpu{gpu}", 0.0), gib), 2)
        return peaks

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


@dataclasses.dataclass
class Step:
    name: str
    seconds: float
    peak_gib: dict[str, float] | None
    note: str = ""


class Deadline(Exception):
    """The process's time is up before a step: the steps done so far are in progress.json."""


class Rehearsal:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).absolute()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.progress_file = self.out / "progress.json"
        # Steps done by earlier processes (--resume), their records and what later steps need.
        progress = json.loads(self.progress_file.read_text()) if args.resume and self.progress_file.exists() else {}
        self.steps: list[Step] = [Step(**s) for s in progress.get("steps", [])]
        self.state: dict = progress.get("state", {})
        self.commands: list[str] = [*progress.get("commands", []), shlex.join([sys.executable, *sys.argv])]
        self.memory = GpuMemory()
        self.started = time.monotonic()

    def done(self, name: str) -> bool:
        return any(s.name == name for s in self.steps)

    def save(self) -> None:
        tmp = self.progress_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"steps": [dataclasses.asdict(s) for s in self.steps], "state": self.state,
                                   "commands": self.commands}, indent=2) + "\n")
        tmp.replace(self.progress_file)

    def step(self, name: str, fn: Callable[[], str | None]):
        """Run and measure one step; `fn` returns a note for the table. A step an earlier process
        finished is skipped; past the deadline no step starts."""
        if self.done(name):
            print(f"[{time.monotonic() - self.started:7.1f} s] {name}: done by an earlier process", flush=True)
            return
        if self.args.deadline_s is not None and time.monotonic() - self.started > self.args.deadline_s:
            self.memory.stop()
            raise Deadline(name)
        print(f"[{time.monotonic() - self.started:7.1f} s] {name} ...", flush=True)
        t0 = time.monotonic()
        note = fn() or ""
        t1 = time.monotonic()
        time.sleep(0.3)  # the sampler's last reading of the step
        self.steps.append(Step(name, round(t1 - t0, 2), self.memory.peak(t0, t1), note))
        self.save()
        print(f"[{time.monotonic() - self.started:7.1f} s] {name}: {t1 - t0:.1f} s"
              + (f", peak {self.steps[-1].peak_gib} GiB" if self.steps[-1].peak_gib else "")
              + (f" ({note})" if note else ""), flush=True)
        if name == self.args.stop_after:
            self.memory.stop()
            raise Deadline(f"after {name}")

    def sh(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        """A step's process, its output into logs/<name>.log; a failure raises with its error."""
        from vaops.components.tracebacks import describe_failure

        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            f.write("$ " + shlex.join(cmd) + "\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        if proc.returncode:
            lines = log.read_text(errors="replace").splitlines()
            raise SystemExit(f"production_path: step {name!r} failed: "
                             f"{describe_failure(lines, ignore=('ChildFailedError',))} (full log: {log})")


def vaops(*args: str) -> list[str]:
    return [sys.executable, "-m", "vaops.pipelines.cli", *args]


# ----- inputs: the base checkpoint and the dataset -----

def rehearsal_preset(name: str):
    """The preset at rehearsal size: robotwin as released; tiny networks with RoboTwin's cameras
    (at tiny sizes), tshape layout and action channels."""
    from vaops.models.config import Camera, get_preset

    robotwin = get_preset("robotwin")
    if name == "robotwin":
        return robotwin
    tiny = get_preset(name)
    main = tiny.cameras[0]
    cameras = (Camera(ROBOTWIN_CAMERAS[0], main.height, main.width),
               *(Camera(key, main.height // 2, main.width // 2) for key in ROBOTWIN_CAMERAS[1:]))
    return tiny.replace(cameras=cameras, layout="tshape", used_action_channels=robotwin.used_action_channels,
                        control_fps=robotwin.control_fps)  # any dataset rate, as released (tiny's is the ALOHA sim's)


def write_base(args, path: Path) -> str:
    import torch

    from vaops.models.checkpoint import write_random_checkpoint

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    write_random_checkpoint(path, rehearsal_preset(args.preset), seed=0, device=args.device, dtype=dtype,
                            max_shard_bytes=SHARD_BYTES.get(args.preset))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the later steps' peaks are their own processes', not this one's cache
    shards = len(list((path / "transformer").glob("*.safetensors")))
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / GIB
    return f"{shards} transformer shards, {size:.1f} GiB, {str(dtype).removeprefix('torch.')}"


def check_base_loads(path: Path) -> None:
    """Each part loads with its own library, as a released checkpoint does."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    from vaops.models.transformer import TransformerConfig

    AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)("a prompt")
    json.loads((path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    TransformerConfig.from_file(path / "transformer" / "config.json")
    AutoencoderKLWan.load_config(path / "vae")
    UMT5EncoderModel.config_class.from_pretrained(path / "text_encoder")


def scene(camera: int, t: int, episode: int) -> np.ndarray:
    """A table, a block that moves and a pad that does not, with a camera's sensor noise (not
    renders: the encoder's input only; without the noise a 40-pixel block moving 5 pixels a frame
    changes a 240x320 frame by under 0.5/255 on average, which validate rightly calls frozen)."""
    h, w = FRAME_HW
    img = np.empty((h, w, 3), np.int16)
    img[:] = (235, 225, 225)
    top = 90 + 12 * camera
    img[top:] = (150, 120, 90)
    x = (40 + 5 * t + 20 * episode + 15 * camera) % (w - 40)
    img[top + 40: top + 80, x: x + 40] = (200, 40, 40)
    img[top + 10: top + 30, w - 90: w - 30] = (40, 60, 200)
    noise = np.random.default_rng((episode, camera, t)).normal(0.0, 3.0, img.shape)
    return np.clip(img + noise.round(), 0, 255).astype(np.uint8)


def write_robotwin_dataset(path: Path, episodes: int, frames: int) -> str:
    """A RoboTwin-shaped LeRobot v3.0 dataset through lerobot's writer (components/dataset.py)."""
    from vaops.components.dataset import Episode, EpisodeMeta, Segment, write_dataset

    rng = np.random.default_rng(0)
    features = {key: {"dtype": "video", "shape": (*FRAME_HW, 3), "names": ["height", "width", "channels"]}
                for key in ROBOTWIN_CAMERAS}
    for key in ("observation.state", "action"):
        features[key] = {"dtype": "float32", "shape": (len(EEF_NAMES),), "names": EEF_NAMES}

    def episode(e: int) -> Episode:
        t = np.arange(frames)[:, None]
        arm = []
        for sign in (-1, 1):
            xyz = np.array([sign * 0.3, -0.3, 0.95]) + 0.002 * t * np.array([1, 1, -1]) + 0.001 * rng.standard_normal((frames, 3))
            yaw = 0.01 * t[:, 0]
            quat = np.stack([np.zeros(frames), np.zeros(frames), np.sin(yaw / 2), np.cos(yaw / 2)], axis=1)
            arm.append(np.concatenate([xyz, quat, np.linspace(1.0, 0.2, frames)[:, None]], axis=1))
        pose = np.concatenate(arm, axis=1).astype(np.float32)
        task = TASKS[e % len(TASKS)]
        videos = {key: np.stack([scene(c, i, e) for i in range(frames)]) for c, key in enumerate(ROBOTWIN_CAMERAS)}
        meta = EpisodeMeta(e, frames, [task], [Segment(0, frames, task)])
        return Episode(meta, {"observation.state": pose, "action": pose}, videos, [task] * frames)

    write_dataset(path, (episode(e) for e in range(episodes)), fps=30, features=features, robot_type="aloha-agilex",
                  total=episodes, desc="write RoboTwin-shaped episodes")
    return f"{episodes} episodes x {frames} frames, 3 cameras {FRAME_HW[0]}x{FRAME_HW[1]}"


# ----- serving and the first-chunk check -----

def first_frames(preset) -> dict[str, np.ndarray]:
    return {c.key: scene(i, 0, 0) for i, c in enumerate(preset.cameras)}


def websocket_episode(url: str, preset, chunks: int, seed: int) -> list[np.ndarray]:
    """reset -> infer -> compute_kv_cache, `chunks` times, as the upstream RoboTwin client does."""
    import websockets.sync.client

    from vaops.models.msgpack_numpy import packb, unpackb

    actions = []
    with websockets.sync.client.connect(url, compression=None, max_size=None, open_timeout=60) as ws:
        unpackb(ws.recv())  # the server's metadata

        def infer(msg: dict) -> dict:
            ws.send(packb(msg))
            reply = ws.recv(timeout=1200)
            if isinstance(reply, str):
                raise RuntimeError(f"the server refused: {reply}")
            return unpackb(reply)

        infer({"reset": True, "prompt": PROMPT, "seed": seed})
        obs = first_frames(preset)
        for k in range(chunks):
            chunk = infer({"obs": obs, "prompt": PROMPT})["action"]
            actions.append(np.asarray(chunk))
            keyframes = [{key: scene(i, 4 * k + j + 1, 0) for i, key in enumerate(obs)}
                         for j in range((preset.frame_chunk_size - (k == 0)) * preset.frames_per_latent)]
            infer({"obs": keyframes, "compute_kv_cache": True, "state": chunk})
    return actions


def direct_first_chunk(checkpoint: Path, device: str, seed: int) -> np.ndarray:
    from vaops.models.checkpoint import load_policy

    policy = load_policy(checkpoint, device=device)  # vaops serve's default dtype (float32)
    if policy.weights.on_gpu:
        policy.warm_up()  # as the server does before it reports ready: the same compiled graphs
    policy.reset(PROMPT, seed=seed)
    return np.asarray(policy.act(first_frames(policy.preset)).actions)


# ----- the rehearsal -----

def train_config(args, gpus: int, stage: int, dataset: Path, output: Path, base: Path):
    from vaops.components.train.config import get_recipe

    recipe = get_recipe(args.preset)
    # ZeRO-3 gathers parameters in hooks the compiled regions cannot call (TrainConfig refuses both):
    # its runs train the recipe's blocks uncompiled.
    compile_blocks = recipe.compile_blocks and stage != 3
    return recipe.replace(dataset=str(dataset), output=str(output), init_from=str(base), steps=args.train_steps,
                          zero_stage=stage, compile_blocks=compile_blocks, save_every=args.train_steps,
                          save_training_state=False, num_workers=0,
                          warmup_steps=0, run_name=f"rehearsal-{gpus}gpu-zero{stage}", system_metrics=False,
                          experiment="vaops-rehearsal")


def runs(args) -> list[tuple[int, int]]:
    """(GPUs, ZeRO stage) per training: the recipe's stage on one GPU, ZeRO-3 on several (and the
    recipe's stage there too with --all-stages)."""
    from vaops.components.train.config import get_recipe

    stage = get_recipe(args.preset).zero_stage
    out = []
    for n in args.gpus:
        if n == 1 or args.all_stages:
            out.append((n, stage))
        if n > 1 and (stage != 3 or not args.all_stages):
            out.append((n, 3))
    return out


def drop_run_artifacts(run_id: str) -> None:
    """Delete an MLflow run's artifacts (the file store's folder); its params and metrics stay."""
    from urllib.parse import urlparse

    import mlflow

    uri = urlparse(mlflow.MlflowClient().get_run(run_id).info.artifact_uri)
    if uri.scheme == "file":
        shutil.rmtree(uri.path, ignore_errors=True)


def fresh(path: Path) -> Path:
    """A step's output folder, without what a process killed during that step left there."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def rehearse(args) -> dict:
    r = Rehearsal(args)
    base, data = r.out / "base", r.out / "data"
    # A file store: the GPU nodes carry mlflow-skinny, which has no SQL store (sqlite needs SQLAlchemy).
    os.environ["MLFLOW_TRACKING_URI"] = (r.out / "mlruns").as_uri()
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    os.environ["VAOPS_MODEL_CACHE"] = str(r.out / "model-cache")
    preset = rehearsal_preset(args.preset)
    dtype_gpu = ["--dtype", "bfloat16"] if args.device.startswith("cuda") else []

    r.step("base checkpoint", lambda: write_base(args, base))
    r.step("base loads", lambda: check_base_loads(base))
    r.step("dataset", lambda: write_robotwin_dataset(fresh(data / "robotwin"), args.episodes, args.frames))
    r.step("validate", lambda: r.sh("validate", vaops("validate", "--dataset", str(data / "robotwin"), "--report-dir",
                                                       str(fresh(data / "reports" / "validate")))))
    r.step("clean", lambda: r.sh("clean", vaops("clean", "--dataset", str(data / "robotwin"), "--output",
                                                 str(fresh(data / "cleaned")), "--report-dir", str(data / "reports" / "clean"),
                                                 "--validation-report", str(data / "reports" / "validate"))))
    r.step("encode", lambda: r.sh("encode", vaops(
        "encode", "--dataset", str(data / "cleaned"), "--output", str(fresh(data / "encoded")), "--report-dir",
        str(data / "reports" / "encode"), "--model-preset", args.preset, "--checkpoint", str(base), "--robot",
        "robotwin", "--device", args.device, *dtype_gpu)))

    from vaops.components.train.cli import train_arguments

    trainings: dict = r.state.setdefault("trainings", {})
    plan = runs(args)
    for i, (gpus, stage) in enumerate(plan):
        tag = f"{gpus}gpu-zero{stage}"
        cfg = train_config(args, gpus, stage, data / "encoded", r.out / "train" / tag, base)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", "-m",
               "vaops.pipelines.cli", "train", *train_arguments(cfg, args.preset)]

        def train(cmd=cmd, cfg=cfg, tag=tag, last=i == len(plan) - 1) -> str:
            fresh(Path(cfg.output))
            # launch.run_local_ranks's command (the TrainJob's entry point), its output in the step's log.
            r.sh(f"train-{tag}", cmd)
            outputs = json.loads((Path(cfg.output) / "outputs.json").read_text())
            trainings[tag] = {"gpus": gpus, "zero_stage": stage, "steps": outputs["steps"],
                              "final_loss": outputs["final_loss"], "checkpoint": outputs["checkpoint"], "model": None}
            if not last:
                # Only the last training is registered and served: at robotwin size the checkpoint
                # each training logs to its MLflow run is 23 GB, a registered copy 23 GB more, each
                # training's output 10 GB, and the disk holds 128 GB (the first GPU run filled it).
                shutil.rmtree(cfg.output)
                drop_run_artifacts(outputs["run_id"])
            return f"{outputs['steps']} steps, final loss {outputs['final_loss']:.4f}"

        r.step(f"train {tag}", train)
    tag = f"{plan[-1][0]}gpu-zero{plan[-1][1]}"
    served = trainings[tag]
    name = f"lingbot-va-rehearsal-{tag}"

    def register() -> str:
        r.sh(f"register-{tag}", vaops("register", served["checkpoint"], "--name", name, "--threshold", "0",
                                      "--output", str(r.out / "register" / tag)))
        served["model"] = f"models:/{name}/1"
        return served["model"]

    r.step(f"register {tag}", register)
    from vaops.components.evaluate.local_server import LocalPolicyServer

    seed = 7
    served_chunk, direct_chunk = r.out / "first_chunk_served.npy", r.out / "first_chunk_direct.npy"

    def serve_episode() -> str:
        with LocalPolicyServer(served["model"], r.logs / "serve.log", device=args.device,
                               startup_timeout_s=900) as server:
            actions = websocket_episode(server.url, preset, args.chunks, seed)
        np.save(served_chunk, actions[0])
        return f"{served['model']}, {len(actions)} chunks of {list(actions[0].shape)}"

    r.step("serve + websocket episode", serve_episode)
    r.step("direct first chunk", lambda: np.save(direct_chunk, direct_first_chunk(Path(served["checkpoint"]),
                                                                                  args.device, seed)))
    served_first, direct_first = np.load(served_chunk), np.load(direct_chunk)
    check = {"model": served["model"], "checkpoint": served["checkpoint"],
             "equal": bool(np.array_equal(direct_first, served_first)),
             "max_abs_diff": float(np.abs(direct_first - served_first).max()), "shape": list(served_first.shape)}
    r.memory.stop()
    return {"command": " ; ".join(r.commands), "preset": args.preset, "device": args.device,
            "total_seconds": round(sum(s.seconds for s in r.steps), 1), "processes": len(r.commands),
            "steps": [dataclasses.asdict(s) for s in r.steps],
            "trainings": [trainings[f"{g}gpu-zero{z}"] for g, z in plan], "first_chunk": check, "machine": machine()}


def machine() -> dict:
    info: dict[str, object] = {"python": sys.version.split()[0]}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    info["cpus"] = os.cpu_count()
    return info


def markdown(result: dict) -> str:
    commands = result["command"].split(" ; ")
    lines = ["# Production path rehearsal", "", f"Command{'s (one process each, in order)' if len(commands) > 1 else ''}:",
             "", *(f"    {c}" for c in commands), "",
             f"Preset `{result['preset']}` on `{result['device']}`, machine {json.dumps(result['machine'])}; "
             f"total {result['total_seconds']} s.", "",
             "| step | wall s | peak GPU memory (GiB, per GPU) | note |", "| --- | ---: | --- | --- |"]
    for s in result["steps"]:
        peak = ", ".join(f"{k} {v}" for k, v in (s["peak_gib"] or {}).items()) or "-"
        lines.append(f"| {s['name']} | {s['seconds']} | {peak} | {s['note']} |")
    lines += ["", "| training | GPUs | ZeRO | steps | final loss | registered |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for t in result["trainings"]:
        registered = f"`{t['model']}`" if t["model"] else "- (output removed: disk)"
        lines.append(f"| {t['gpus']}gpu-zero{t['zero_stage']} | {t['gpus']} | {t['zero_stage']} | {t['steps']} | "
                     f"{t['final_loss']:.4f} | {registered} |")
    c = result["first_chunk"]
    lines += ["", f"First chunk through the server (`{c['model']}`, websocket) vs the trained checkpoint run "
                  f"directly: {'identical' if c['equal'] else 'DIFFERENT'} (max abs diff {c['max_abs_diff']:.3g}, "
                  f"shape {c['shape']}).", ""]
    return "\n".join(lines)


def parse_gpus(text: str) -> list[int]:
    try:
        gpus = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of GPU counts") from None
    if not gpus or min(gpus) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: GPU counts must be >= 1")
    return gpus


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "robotwin"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--gpus", type=parse_gpus, default=[1], help="GPU counts (processes) to train on, e.g. 1,2")
    p.add_argument("--all-stages", action="store_true",
                   help="on several GPUs train with the recipe's ZeRO stage as well as ZeRO-3 (one more training)")
    p.add_argument("--out", required=True, type=Path, help="folder for everything the rehearsal writes")
    p.add_argument("--episodes", type=int, default=2)
    p.add_argument("--frames", type=int, help="frames per episode at 30 fps (default: 57 tiny, 121 robotwin: "
                                              "8 latent frames, over the recipe's shortest window)")
    p.add_argument("--train-steps", type=int, default=3)
    p.add_argument("--chunks", type=int, default=2, help="chunks of the served episode")
    p.add_argument("--results-md", type=Path, help="also write the Markdown here (bench/results/production_path.md)")
    p.add_argument("--deadline-s", type=float, help="start no step after this many seconds: exit 3, go on with --resume")
    p.add_argument("--stop-after", metavar="STEP", help="end this process after the step of that name (exit 3)")
    p.add_argument("--resume", action="store_true", help="skip the steps an earlier process recorded in <out>/progress.json")
    args = p.parse_args()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < max(args.gpus):
            p.error(f"--gpus {max(args.gpus)} needs that many CUDA GPUs; this machine has "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    elif max(args.gpus) > 1:
        p.error("--gpus above 1 needs --device cuda (on CPU the rehearsal trains in one process)")
    if args.resume and not (args.out / "progress.json").exists():
        p.error(f"--resume: {args.out / 'progress.json'} does not exist (no earlier process to go on from)")
    if not args.resume and args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} is not empty; give a new folder (or --resume)")
    args.frames = args.frames or (121 if args.preset == "robotwin" else 57)
    try:
        result = rehearse(args)
    except Deadline as stop:
        print(f"production_path: stopped before step {stop} (--deadline-s / --stop-after); the steps done are in "
              f"{args.out / 'progress.json'}: go on with --resume", flush=True)
        return 3
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "production_path.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "production_path.md").write_text(text)
    if args.results_md:
        args.results_md.parent.mkdir(parents=True, exist_ok=True)
        args.results_md.write_text(text)
    print(text)
    return 0 if result["first_chunk"]["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
