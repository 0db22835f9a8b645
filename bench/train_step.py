"""Training-step throughput on 1, 2 and 4 GPUs of one host: `robotwin` preset (5.09 B), bf16, flex attention.

One sample is 16 latent frames: [noisy video | clean video | noisy actions | clean actions] =
2 x 16 x 120 + 2 x 16 x 16 = 4,352 tokens. The reference trainer (FSDP2, flex attention,
activation checkpointing, fused AdamW) measured 0.697 s/step = 6,246 tokens/s on one H200.

A configuration is `ENGINE:CKPT:COMPILE:BATCHES[:ACCUM]` (`--config`, repeatable), run on every GPU count
of `--gpus`, each in its own process group under torchrun (the launcher of `vaops train` and of
its TrainJob) on a clean set of GPUs:
- ENGINE `fsdp2`: the reference's recipe, measured in the same run on the same GPUs (the in-run
  baseline): bf16 parameters, FSDP2 with fp32 gradient reduction, activation checkpointing as a
  wrapper around each block, fused AdamW (upstream wan_va/distributed/fsdp.py, train.py);
  `z0`..`z3`: the trainer's engine (DeepSpeed ZeRO stage 0-3, bf16, fused AdamW; stage 0 keeps the
  fp32 masters in components/train/master_weights.py's multi-tensor AdamW);
  `shipped`: what `vaops train` runs for robotwin (config.SCALE_OUT_EXECUTION), at its micro-batch
  and with samples of its max_latent_frames (instead of --frames) where it sets them.
- CKPT `full` (every block recomputed), `half` (every 2nd block), `off`.
- COMPILE `on`: torch.compile of the blocks' attention-free regions (ZeRO <= 2), `off`.
- BATCHES: micro-batches per GPU, ascending, each `+`-separated; the sweep stops at the first OOM.
- ACCUM: micro-steps per optimizer step (gradient accumulation, DeepSpeed engines), default 1; a row's
  batch reads `2x4` then, and its tokens count all micro-steps of the step.
Per row: s/step, tokens/s per GPU and on all GPUs, the ratio per GPU to the in-run FSDP2 baseline
on the same GPU count (its best batch) and to the reference's 6,246, MFU, peak memory, and the
scaling efficiency against the same configuration and batch on one GPU.

    python bench/train_step.py --gpus 1,2 --steps 4 --warmup 2 --deadline-s 480 --out /tmp/ts \\
        --config fsdp2:full:off:1 --config z2:off:on:2+3 --config z0:off:on:1+2 --config z2:half:on:4 \\
        --config shipped                                          # 2 x H200: ~8 min
    python bench/train_step.py --gpus 1,2,4 ...                   # the same on 4 GPUs
    python bench/train_step.py --gpus 1 --config z0:off:on:1+2     # one GPU's fastest (fp32 masters, compiled)
    python bench/train_step.py --preset tiny --device cpu --gpus 1,2 --frames 4 --steps 1 --warmup 1 \\
        --config fsdp2:full:off:1 --config z2:half:off:1 --out /tmp/ts-cpu      # smoke test, gloo

One-GPU jobs of one configuration group run side by side, one per GPU (as do two-GPU jobs on four
GPUs); `--serial` runs one at a time. A job takes 1-2 minutes (model and engine set-up, the flex
and region compiles, the batch sweep); `--deadline-s S` starts no job after S seconds and stops
the ones running then; the JSON and Markdown under `--out` are rewritten after every job (and
each job's output appended to its workers.log), so a lease's end leaves the rows measured so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REFERENCE_TOKENS_PER_S = 6246.0  # upstream FSDP2 trainer, 0.697 s/step on one H200
TARGET_X_REFERENCE = 1.5  # issue 14: per GPU on 2 and 4 GPUs
TARGET_SCALING = 0.9  # 1 -> 4 GPUs
TARGET_MFU = 0.4
RESULT_PREFIX = "RESULT "
CKPT_EVERY = {"off": 0, "full": 1, "half": 2}  # recompute every n-th block; 0: none
ENGINES = ("fsdp2", "z0", "z1", "z2", "z3", "shipped")


# ----- one configuration, in every rank of a worker process group -----

def flops_per_sample(preset, frames: int, chunk: int, window: int) -> float:
    """Model FLOPs of one training step per sample (forward + backward = 3 x forward; activation
    recomputation not counted): linear layers per token and per text token, self-attention over the
    teacher-forced mask's allowed pairs, cross-attention to 512 text tokens."""
    from vaops.models.attention import teacher_forced_mask

    cfg = preset.transformer
    d, f_dim, layers = cfg.inner_dim, cfg.ffn_dim, cfg.num_layers
    h, w = preset.latent_hw
    vtok, n = (h // 2) * (w // 2), preset.action_per_frame
    tokens = 2 * frames * (vtok + n)
    text = preset.text_encoder.max_length
    pairs = float(teacher_forced_mask(frames, vtok, frames, n, chunk, window).sum())
    per_layer = (2 * tokens * (6 * d * d + 2 * d * f_dim)  # q k v o, cross q o, FFN
                 + 2 * text * 2 * d * d  # cross-attention k v over the text
                 + 4 * d * pairs + 4 * d * tokens * text)  # attention scores and values
    video, actions, patch = 2 * frames * vtok, 2 * frames * n, cfg.in_channels * 4
    # patch embedding of every video token, output projection of the noisy half; the same for
    # actions (30 channels); the text projection (text_dim -> d -> d) of the 512 text tokens
    io = 2 * (video * patch * d + video // 2 * d * patch + actions * 30 * d + actions // 2 * d * 30
              + text * (cfg.text_dim * d + d * d))
    return 3.0 * (layers * per_layer + io)


def step_inputs(preset, batch_size: int, frames: int, chunk: int, window: int, device: torch.device):
    """One step's inputs for `batch_size` random samples, drawn as the trainer draws them."""
    from vaops.components.train.config import TrainConfig
    from vaops.components.train.data import Batch
    from vaops.components.train.objective import TeacherForcing, draw_inputs

    h, w = preset.latent_hw
    n, text_dim = preset.action_per_frame, preset.transformer.text_dim
    teacher = TeacherForcing.from_config(TrainConfig(preset=preset.name), preset)
    g = torch.Generator().manual_seed(batch_size)
    mask = torch.zeros(batch_size, 30, frames, n, 1, dtype=torch.bool)
    mask[:, list(preset.used_action_channels)] = True
    batch = Batch(torch.randn(batch_size, 48, frames, h, w, generator=g),
                  torch.randn(batch_size, 30, frames, n, 1, generator=g) * mask, mask,
                  torch.randn(batch_size, 512, text_dim, generator=g).to(torch.bfloat16))
    x = draw_inputs(batch, torch.zeros(512, text_dim, dtype=torch.bfloat16), teacher, g)
    return dataclasses.replace(x, chunk=chunk, window=window).to(device, torch.bfloat16)


def shard_like_reference(module: torch.nn.Module, ckpt_every: int) -> None:
    """The reference's FSDP2 recipe on `module` (a TeacherForcedModel): bf16 parameters, each block
    wrapped for activation checkpointing *outside* its FSDP unit, no cast of forward inputs.

    Checkpointing inside the unit (the model's own gradient_checkpointing around an FSDP-wrapped
    block) fails on torch <= 2.11: FSDP2 casts a unit's floating inputs to bf16 in its pre-forward
    hook, but skips that hook while recomputing in backward, so the rotary tables came back fp32
    where the forward had saved bf16 ("Recomputed values ... have different metadata")."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = module.transformer
    module.to(torch.bfloat16)
    model.gradient_checkpointing = False
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for i, block in enumerate(model.blocks):
        # text_context() projects the text through every block's cross-attention k/v before the
        # trunk runs, outside the block's forward: those layers need their own FSDP units.
        for layer in (block.attn2.to_k, block.attn2.to_v, block.attn2.norm_k):
            fully_shard(layer, mp_policy=policy)
        if ckpt_every and i % ckpt_every == 0:
            block = model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)


def worker(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vaops.components.train.config import AttentionBackend, TrainConfig
    from vaops.components.train.distributed import build_engine, init_distributed
    from vaops.components.train.objective import TeacherForcedModel, build_model
    from vaops.models.config import get_preset

    info = init_distributed()
    preset = get_preset(args.preset)
    cuda = info.cuda
    backend: AttentionBackend = "flex" if cuda else "sdpa"
    every = CKPT_EVERY[args.ckpt]
    fsdp2 = args.engine == "fsdp2"
    cfg = TrainConfig(preset=args.preset, zero_stage=0 if fsdp2 else args.zero_stage, precision="bf16",
                      attention=backend, activation_checkpointing=every > 0, checkpoint_every=max(every, 1),
                      compile_blocks=args.compile == "on", offload_optimizer=args.offload_optimizer, micro_batch=1,
                      grad_accum=args.grad_accum, lr=1e-5)
    torch.manual_seed(0)
    model = build_model(cfg, preset, None, bf16=True, device=info.device)
    module = TeacherForcedModel(model, backend)
    if fsdp2:
        shard_like_reference(module, every)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)

        def step(x):
            loss = module(x)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 2.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        engine = build_engine(module, cfg, info, external_params=[model.scale_shift_table],
                              ds_overrides=json.loads(args.ds_override) if args.ds_override else None)

        def step(x):
            for _ in range(args.grad_accum):  # DeepSpeed steps the optimizer at the accumulation boundary
                loss = engine(x)[0]
                engine.backward(loss)
                engine.step()

    h, w = preset.latent_hw
    flops = flops_per_sample(preset, args.frames, args.chunk, args.window)
    for batch_size in args.batch_sizes:
        row = {"engine": args.engine, "zero_stage": None if fsdp2 else args.zero_stage, "ckpt": args.ckpt,
               "compile": args.compile, "gpus": info.world, "batch": batch_size, "grad_accum": args.grad_accum,
               "tokens_per_sample": 2 * args.frames * ((h // 2) * (w // 2) + preset.action_per_frame)}
        try:
            x = step_inputs(preset, batch_size, args.frames, args.chunk, args.window, info.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup):
                step(x)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(x)
            if cuda:
                torch.cuda.synchronize()
            s_step = (time.perf_counter() - start) / args.steps
            samples = batch_size * args.grad_accum  # per GPU and optimizer step
            per_gpu = samples * row["tokens_per_sample"] / s_step
            row.update(s_per_step=s_step, tokens_per_s_per_gpu=per_gpu, tokens_per_s=per_gpu * info.world,
                       tflops_per_gpu=samples * flops / s_step / 1e12,
                       mfu=samples * flops / s_step / (args.peak_tflops * 1e12) if cuda else None,
                       peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as e:  # report and go on with the next configuration
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        if info.is_main:
            print(RESULT_PREFIX + json.dumps(row), flush=True)
        if "error" in row:
            if info.world > 1:
                # A rank that did not fail may wait in a collective for this one: a non-zero exit
                # makes torchrun end every rank now, not at the job's time limit.
                sys.stdout.flush()
                os._exit(3)
            break  # larger batches would fail too, and an OOM may leave the optimizer half-updated
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# ----- the orchestrating process -----

@dataclasses.dataclass(frozen=True)
class Config:
    engine: str  # fsdp2 | z0..z3 (shipped is resolved into these)
    ckpt: str
    compile: str
    batches: tuple[int, ...]
    shipped: bool = False
    grad_accum: int = 1  # micro-steps per optimizer step: the step's fixed cost (ZeRO's reduce, AdamW) amortised
    frames: int | None = None  # latent frames per sample; None: --frames (shipped: its max_latent_frames)


    @property
    def zero_stage(self) -> int:
        return 0 if self.engine == "fsdp2" else int(self.engine[1])

    @property
    def label(self) -> str:
        name = "shipped=" + self.engine if self.shipped else self.engine
        accum = f" accum={self.grad_accum}" if self.grad_accum > 1 else ""
        frames = f" frames={self.frames}" if self.frames is not None else ""
        return f"{name} ckpt={self.ckpt} compile={self.compile}{accum}{frames}"


def shipped_config() -> Config:
    from vaops.components.train.config import SCALE_OUT_EXECUTION as e

    ckpt = "off" if not e["activation_checkpointing"] else {1: "full", 2: "half"}.get(e["checkpoint_every"])
    if ckpt is None:
        raise ValueError(f"SCALE_OUT_EXECUTION: checkpoint_every {e['checkpoint_every']} has no bench name")
    return Config(f"z{e['zero_stage']}", ckpt, "on" if e["compile_blocks"] else "off", (e["micro_batch"],), True,
                  e.get("grad_accum", 1), e.get("max_latent_frames"))


def parse_config(text: str) -> Config:
    """ENGINE:CKPT:COMPILE:BATCHES[:ACCUM], e.g. z2:half:on:2+4 or z2:off:on:2:4 (4 micro-batches of 2
    per optimizer step); `shipped` alone is the trainer's own."""
    if text == "shipped":
        return shipped_config()
    parts = text.split(":")
    if len(parts) not in (4, 5) or (len(parts) == 5 and not parts[4].isdigit()):
        raise ValueError(f"--config {text!r}: expected ENGINE:CKPT:COMPILE:BATCHES[:ACCUM], e.g. z2:off:on:1+2")
    engine, ckpt, compile_, batches = parts[:4]
    accum = int(parts[4]) if len(parts) == 5 else 1
    if engine not in ENGINES[:-1]:
        raise ValueError(f"--config {text!r}: engine must be one of {ENGINES}")
    if ckpt not in CKPT_EVERY:
        raise ValueError(f"--config {text!r}: ckpt must be one of {sorted(CKPT_EVERY)}")
    if compile_ not in ("on", "off"):
        raise ValueError(f"--config {text!r}: compile must be on or off")
    if compile_ == "on" and engine in ("z3", "fsdp2"):
        raise ValueError(f"--config {text!r}: compiled blocks need ZeRO <= 2 (parameter hooks inside the regions)")
    if accum < 1 or (accum > 1 and engine == "fsdp2"):
        raise ValueError(f"--config {text!r}: ACCUM must be >= 1, and 1 for the fsdp2 baseline (the reference's step)")
    return Config(engine, ckpt, compile_, tuple(int(b) for b in batches.split("+")), grad_accum=accum)


def launch_command(args, config: Config, gpus: int) -> list[str]:
    """torchrun (as `vaops train` and its TrainJob run) over this script's worker, on `gpus` processes."""
    from vaops.components.train.k8s import torchrun_command

    program = [str(Path(__file__).resolve()), "--worker", "--engine", config.engine, "--zero-stage",
               str(config.zero_stage), "--ckpt", config.ckpt, "--compile", config.compile, "--preset", args.preset,
               "--frames", str(config.frames or args.frames), "--chunk", str(args.chunk), "--window", str(args.window),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--peak-tflops", str(args.peak_tflops),
               "--device", args.device, "--batch-sizes", ",".join(map(str, config.batches)),
               "--grad-accum", str(config.grad_accum)]
    if args.offload_optimizer:
        program.append("--offload-optimizer")
    if args.ds_override:
        program += ["--ds-override", args.ds_override]
    return torchrun_command(program, no_python=False, nproc_per_node=gpus, standalone=True,
                            launcher=(sys.executable, "-m", "torch.distributed.run"))


@dataclasses.dataclass(frozen=True)
class Job:
    config: Config
    gpus: int

    @property
    def label(self) -> str:
        return f"{self.config.label} gpus={self.gpus}"


@dataclasses.dataclass(frozen=True)
class Running:
    job: Job
    devices: list[int]
    proc: subprocess.Popen
    log: Path
    started: float


def plan(configs: list[Config], gpu_counts: list[int], total: int, serial: bool) -> list[Job]:
    """Jobs in run order: configurations in groups of as many as the smallest GPU count fits side by
    side, each group's jobs by GPU count, so one-GPU jobs pair up on a two-GPU host."""
    group = 1 if serial else max(1, total // min(gpu_counts))
    jobs = []
    for start in range(0, len(configs), group):
        for g in sorted(gpu_counts):
            jobs += [Job(c, g) for c in configs[start:start + group]]
    return jobs


def rows_of(job: Job, text: str, rc) -> list[dict]:
    rows = [json.loads(line[len(RESULT_PREFIX):]) for line in text.splitlines() if line.startswith(RESULT_PREFIX)]
    for r in rows:
        r["shipped"] = job.config.shipped
    if not rows or (rc not in (0, None) and "error" not in rows[-1]):
        from vaops.components.tracebacks import describe_failure

        lines = [line for line in text.strip().splitlines() if not line.startswith(RESULT_PREFIX)]
        # the first failing rank's exception, not torchrun's summary of which rank died
        tail = describe_failure(lines, ignore=("ChildFailedError",)) or "\n".join(lines[-15:])
        done = {r["batch"] for r in rows}
        batch = next((b for b in job.config.batches if b not in done), job.config.batches[-1])
        rows.append({"engine": job.config.engine, "zero_stage": None if job.config.engine == "fsdp2"
                     else job.config.zero_stage, "ckpt": job.config.ckpt, "compile": job.config.compile,
                     "gpus": job.gpus, "batch": batch, "shipped": job.config.shipped,
                     "error": f"exit {rc}: {tail[-600:]}"})
    return rows


def run_jobs(args, jobs: list[Job], total: int, on_rows) -> list[Job]:
    """Run `jobs` in order, each on free GPUs as soon as enough are; returns the jobs never started."""
    start_all = time.monotonic()
    free = list(range(total))
    queue, running = list(jobs), list[Running]()
    logs = Path(tempfile.mkdtemp(prefix="train_step-"))  # each job's output, appended to workers.log when done
    while queue or running:
        elapsed = time.monotonic() - start_all
        past_deadline = args.deadline_s is not None and elapsed > args.deadline_s - args.min_job_s
        while queue and not past_deadline and len(free) >= queue[0].gpus:
            job = queue.pop(0)
            devices, free = free[:job.gpus], free[job.gpus:]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if args.device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
            cmd = launch_command(args, job.config, job.gpus)
            log = logs / (job.label.replace(" ", "_").replace("=", "-") + ".log")
            print(f"--- {job.label} on {args.device} {devices}: {' '.join(cmd)}", flush=True)
            with open(log, "w") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            running.append(Running(job, devices, proc, log, time.monotonic()))
        if past_deadline and not running:
            break
        time.sleep(0.5)
        now = time.monotonic()
        for r in list(running):
            rc: int | str | None = r.proc.poll()
            limit = args.timeout if args.deadline_s is None else min(args.timeout,
                                                                   args.deadline_s - (r.started - start_all))
            if rc is None and now - r.started > limit:
                os.killpg(r.proc.pid, signal.SIGKILL)  # torchrun and its ranks: the job's own session
                r.proc.wait()
                rc = "timeout"
            elif rc is None:
                continue
            running.remove(r)
            free = sorted(free + r.devices)
            text = r.log.read_text(errors="replace")
            with open(args.out / "workers.log", "a") as f:
                f.write(f"===== {r.job.label} on {r.devices}: exit {rc}, {now - r.started:.0f} s\n{text}\n")
            rows = rows_of(r.job, text, rc)
            print(f"    {r.job.label}: {now - r.started:.0f} s, exit {rc}, {len(rows)} row(s)", flush=True)
            on_rows(rows)
    return queue


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def derive(rows: list[dict]) -> tuple[list[dict], dict]:
    """Each measured row's ratios: per GPU to the reference and to the in-run FSDP2 baseline of the
    same GPU count (its best batch), scaling efficiency to the same configuration and batch on one
    GPU; and the summary against issue 14's targets."""
    ok = [r for r in rows if "tokens_per_s_per_gpu" in r]
    baseline: dict[int, float] = {}
    for r in ok:
        if r["engine"] == "fsdp2":
            baseline[r["gpus"]] = max(baseline.get(r["gpus"], 0.0), r["tokens_per_s_per_gpu"])
    key = lambda r: (r["engine"], r["zero_stage"], r["ckpt"], r["compile"], r["batch"], r.get("grad_accum", 1))  # noqa: E731
    single = {key(r): r["tokens_per_s_per_gpu"] for r in ok if r["gpus"] == 1}
    for r in ok:
        per_gpu = r["tokens_per_s_per_gpu"]
        r["x_reference"] = per_gpu / REFERENCE_TOKENS_PER_S
        r["x_fsdp2"] = per_gpu / baseline[r["gpus"]] if r["gpus"] in baseline else None
        r["scaling"] = per_gpu / single[key(r)] if key(r) in single else None
    summary: dict = {"reference_tokens_per_s": REFERENCE_TOKENS_PER_S, "fsdp2_baseline_per_gpu": baseline,
                     "best": {}}
    for g in sorted({r["gpus"] for r in ok}):
        best = max((r for r in ok if r["gpus"] == g and r["engine"] != "fsdp2"),
                   key=lambda r: r["tokens_per_s_per_gpu"], default=None)
        if best is not None:
            summary["best"][g] = {k: best.get(k) for k in ("engine", "zero_stage", "ckpt", "compile", "batch", "grad_accum",
                                                             "tokens_per_s_per_gpu", "x_reference", "x_fsdp2",
                                                             "mfu", "scaling", "peak_memory_gib")}
    if 1 in summary["best"]:  # scaling of the best recipe per GPU count against the best on one GPU
        for b in summary["best"].values():
            b["scaling_of_best"] = b["tokens_per_s_per_gpu"] / summary["best"][1]["tokens_per_s_per_gpu"]
    multi = {g: b for g, b in summary["best"].items() if g > 1}
    summary["targets"] = {
        "per_gpu_1.5x_reference": {g: b["x_reference"] >= TARGET_X_REFERENCE for g, b in multi.items()},
        "scaling_0.9": {g: b["scaling"] is not None and b["scaling"] >= TARGET_SCALING for g, b in multi.items()},
        "mfu_0.4_any": any((r.get("mfu") or 0) >= TARGET_MFU for r in ok),
    }
    return rows, summary


COLUMNS = ("engine", "ZeRO", "ckpt", "compile", "GPUs", "batch", "s/step", "tokens/s per GPU", "tokens/s all",
           "x reference", "x FSDP2", "MFU", "scaling", "peak GiB", "note")


def table_row(r: dict) -> list[str]:
    name = ("shipped " if r.get("shipped") else "") + r["engine"]
    accum = r.get("grad_accum", 1)
    batch = f"{r['batch']}x{accum}" if accum > 1 else str(r["batch"])
    return [name, fmt(r.get("zero_stage"), "d"), r["ckpt"], r["compile"], str(r["gpus"]), batch,
            fmt(r.get("s_per_step"), ".3f"), fmt(r.get("tokens_per_s_per_gpu"), ",.0f"),
            fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("x_reference"), ".2f"), fmt(r.get("x_fsdp2"), ".2f"),
            fmt(r.get("mfu") and 100 * r["mfu"], ".1f") + ("%" if r.get("mfu") else ""),
            fmt(r.get("scaling") and 100 * r["scaling"], ".0f") + ("%" if r.get("scaling") else ""),
            fmt(r.get("peak_memory_gib"), ".1f"),
            r["error"].splitlines()[0][:100].replace("|", "/") if r.get("error") else ""]


def summary_lines(summary: dict) -> list[str]:
    lines = []
    for g, b in summary["best"].items():
        lines.append(f"best on {g} GPU(s): {b['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, "
                     f"{b['x_reference']:.2f}x the reference, {fmt(b['x_fsdp2'], '.2f')}x the in-run FSDP2, "
                     f"MFU {fmt(b['mfu'] and 100 * b['mfu'], '.1f')}%, "
                     f"scaling {fmt(b['scaling'] and 100 * b['scaling'], '.0f')}% "
                     f"(best to best {fmt(b.get('scaling_of_best') and 100 * b['scaling_of_best'], '.0f')}%) "
                     f"({b['engine']} ckpt={b['ckpt']} compile={b['compile']} batch {b['batch']}"
                     f"{' x ' + str(b['grad_accum']) + ' accumulated' if (b.get('grad_accum') or 1) > 1 else ''}, "
                     f"peak {fmt(b['peak_memory_gib'], '.1f')} GiB)")
    t = summary["targets"]
    lines.append(f"targets: per GPU >= {TARGET_X_REFERENCE}x reference {t['per_gpu_1.5x_reference']}, "
                 f"scaling >= {TARGET_SCALING:.0%} {t['scaling_0.9']}, MFU >= {TARGET_MFU:.0%} on any row "
                 f"{t['mfu_0.4_any']}")
    return lines


def write_results(args, rows: list[dict], unstarted: list[Job], meta: dict) -> tuple[list[dict], dict]:
    rows, summary = derive(rows)
    summary["not_run"] = [j.label for j in unstarted]
    (args.out / "train_step.json").write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=2))
    md = [f"# bench/train_step.py: {meta['preset']}, {meta['tokens_per_sample']} tokens per sample, "
          f"{meta['device_name']}", "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    md += ["| " + " | ".join(table_row(r)) + " |" for r in rows]
    md += ["", *summary_lines(summary), "", f"Command: `{meta['command']}`"]
    if summary["not_run"]:
        md.append(f"Not run (deadline): {', '.join(summary['not_run'])}")
    (args.out / "train_step.md").write_text("\n".join(md) + "\n")
    return rows, summary


def print_table(rows: list[dict]) -> None:
    cells = [list(COLUMNS)] + [table_row(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    for i, c in enumerate(cells):
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)) + "  " + c[-1])
        if i == 0:
            print("-" * (sum(widths) + 2 * len(widths)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="robotwin")
    p.add_argument("--frames", type=int, default=16, help="latent frames per sample")
    p.add_argument("--chunk", type=int, default=2, help="teacher-forcing chunk size (upstream draws 1-4)")
    p.add_argument("--window", type=int, default=64, help="attention window in blocks (upstream draws 4-64)")
    p.add_argument("--gpus", default="1", help="GPU counts of one host, e.g. 1,2,4 (processes on --device cpu)")
    p.add_argument("--config", action="append", default=[], metavar="ENGINE:CKPT:COMPILE:BATCHES",
                   help="a configuration (repeatable), e.g. fsdp2:full:off:1, z2:half:on:2+4, shipped; "
                        "default: fsdp2:full:off:1, shipped, z2:off:on:1+2")
    p.add_argument("--ds-override", help="JSON merged into every DeepSpeed configuration (bucket sizes, prefetch)")
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200 SXM)")
    p.add_argument("--timeout", type=float, default=540, help="seconds per job")
    p.add_argument("--deadline-s", type=float, help="start no job after this many seconds (less --min-job-s), "
                                                     "stop running ones at it")
    p.add_argument("--min-job-s", type=float, default=60,
                   help="with --deadline-s: the least time a job is started with")
    p.add_argument("--serial", action="store_true", help="one job at a time (no one-GPU jobs side by side)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", type=Path, default=Path("outputs/train_step"),
                   help="folder for train_step.json, train_step.md and workers.log (every job's output)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=ENGINES[:-1], default="z2", help=argparse.SUPPRESS)
    p.add_argument("--zero-stage", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", choices=tuple(CKPT_EVERY), default="full", help=argparse.SUPPRESS)
    p.add_argument("--compile", choices=("on", "off"), default="off", help=argparse.SUPPRESS)
    p.add_argument("--batch-sizes", default="1", help=argparse.SUPPRESS)
    p.add_argument("--grad-accum", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.worker:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        worker(args)
        return
    try:
        configs = [parse_config(c) for c in args.config or ["fsdp2:full:off:1", "shipped", "z2:off:on:1+2"]]
    except ValueError as e:
        p.error(str(e))
    gpu_counts = sorted({int(g) for g in args.gpus.split(",")})
    if args.device == "cuda":
        # The GPUs' names from nvidia-smi: no CUDA context of this process on GPU 0 beside a job's.
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True) if shutil.which("nvidia-smi") else None
        total = torch.cuda.device_count()
        name = f"{smi.stdout.splitlines()[0] if smi and smi.returncode == 0 and smi.stdout else 'GPU'} x {total}"
        if max(gpu_counts) > total:
            p.error(f"--gpus {args.gpus}: this host has {total} GPU(s)")
    else:
        total, name = max(gpu_counts), f"CPU ({os.cpu_count()} cores), gloo"
    print(f"device: {name}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    from vaops.models.config import get_preset

    preset = get_preset(args.preset)
    h, w = preset.latent_hw
    meta = {"preset": args.preset, "frames": args.frames, "chunk": args.chunk, "window": args.window,
            "tokens_per_sample": 2 * args.frames * ((h // 2) * (w // 2) + preset.action_per_frame),
            "device_name": name, "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup,
            "peak_tflops": args.peak_tflops, "command": " ".join(sys.argv)}
    rows: list[dict] = []

    def on_rows(new: list[dict]) -> None:
        rows.extend(new)
        write_results(args, rows, [], meta)

    unstarted = run_jobs(args, plan(configs, gpu_counts, total, args.serial), total, on_rows)
    rows, summary = write_results(args, rows, unstarted, meta)
    print()
    print_table(rows)
    print("\n" + "\n".join(summary_lines(summary)))
    if unstarted:
        print(f"not run (deadline): {', '.join(j.label for j in unstarted)}")
    print(f"results: {args.out / 'train_step.json'}, {args.out / 'train_step.md'}")


if __name__ == "__main__":
    main()
