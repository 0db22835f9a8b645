"""Do the `small` preset's random-weight VAE latents keep the cube's position? (issue 12)

A linear (ridge) probe reads the cube's world (x, y) from the normalised latents of the top camera,
against the same probe on the pixels the VAE was given, on frames the project's own sim renders:

  frames    the top camera at the preset's size (`sim.render_top`, what demos record and a policy
            sees): the reset frame of every seed, plus frames mid-episode from the scripted expert's
            replay (`sim.plan_joint_trajectory` + the joint-space scene, as `demos.stage.rollout`
            does) for every `--rollout-every`-th seed, where the gripper approaches, grasps and
            carries the cube; the target is the cube body's world (x, y) at that frame.
  latents   `build_vae(preset.vae, seed)` (random weights), encoded exactly as the encode stage's
            `VideoEncoder` does a one-frame clip (checked against it on the first frame): frames ->
            `frames_to_video` -> causal encoder -> `normalize_latents` with the VAE's own stats;
            [48, 1, 12, 16] per frame, flattened.
  pixels    the same frames area-averaged to 48x64 RGB (as many features as the latent), 36x48 RGB,
            and the full 192x256 RGB.
  probe     ridge regression with an unpenalised intercept, solved in the dual (kernel) form so the
            full-resolution pixels fit; features centred or z-scored with train statistics and the
            ridge strength chosen by 5-fold cross-validation grouped by seed on the train seeds; the
            held-out seeds (the last `--test` ones) are scored once. Baseline: the train mean.
  also      a cheap nonlinear check (a fixed random ReLU expansion of every latent cell, and of every
            16x16 pixel patch as its control), a second VAE seed, per-channel latent statistics, and
            `--vae-config` to try another VAE size (JSON of VAEConfig fields).

    MUJOCO_GL=egl python bench/vae_probe.py                         # ~8 min on 2 CPU cores
    MUJOCO_GL=egl python bench/vae_probe.py --seeds 120 --test 40 --rollout-every 20 --out /tmp/probe
    MUJOCO_GL=egl python bench/vae_probe.py --vae-config '{"base_dim": 64}' --out /tmp/probe64
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vaops.components.demos import sim  # noqa: I001  (imports triton before EGL, see sim.py)
from gym_aloha.tasks import sim as joint_tasks
from vaops.models.config import PRESETS
from vaops.models.observation import VideoEncoder, frames_to_video
from vaops.models.vae import StreamingEncoder, build_vae, latent_stats, normalize_latents

ROLLOUT_FRAMES = (10, 18, 22, 26, 34, 42)  # approach, grasp, lift, carry, hand-over (48-frame episode)
TIME_SCALE = 0.6   # DemosConfig's default: 240 control steps
FPS = 10           # DemosConfig's default: hold 5 control steps per recorded frame
FOLDS = 5
LAMBDAS = np.logspace(-9, 2, 45)  # times the mean diagonal of the centred train Gram matrix


# ---------------------------------------------------------------------------------------------- frames

def cube_xyz(physics) -> np.ndarray:
    return physics.named.data.qpos["red_box_joint"][:3].copy()


class Scene:
    """One joint-space scene re-used for every seed: `sim.joint_environment` reads the object poses
    from gym-aloha's BOX_POSE at each reset, so `reset(seed)` gives the state a fresh
    `sim.joint_environment(task, object_poses(task, seed))` does (checked in `make_frames`), without
    a new physics and rendering context per seed (0.4 s each here)."""

    def __init__(self, task: str):
        self.task = task
        self.env, self.physics = sim.joint_environment(task, sim.object_poses(task, 0))

    def reset(self, seed: int):
        joint_tasks.BOX_POSE[0] = sim.object_poses(self.task, seed)
        return self.env.reset().observation


def reset_frame(scene: Scene, seed: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The frame a policy sees at `env.reset(seed)` (as components/evaluate/aloha.py makes it)."""
    scene.reset(seed)
    return sim.render_top(scene.physics, height, width), cube_xyz(scene.physics)


def rollout_frames(scene: Scene, seed: int, height: int, width: int, frames: tuple[int, ...]):
    """`sim.replay` of the scripted plan (same targets, same float32 rounding, same hold), rendering
    only `frames` and reading the cube's pose there; also returns the states to check against
    `sim.replay`."""
    hold = sim.CONTROL_HZ // FPS
    joints = sim.plan_joint_trajectory(scene.task, sim.object_poses(scene.task, seed), TIME_SCALE)
    env, physics = scene.env, scene.physics
    obs = scene.reset(seed)
    previous = obs["qpos"]
    images, cubes, states = [], [], []
    for i in range(len(joints) // hold):
        states.append(obs["qpos"])
        if i in frames:
            images.append(sim.render_top(physics, height, width))
            cubes.append(cube_xyz(physics))
        action = joints[(i + 1) * hold - 1].astype(np.float32).astype(np.float64)
        for target in sim.hold_targets(previous, action, hold):
            step = env.step(target)
        obs, previous = step.observation, action
    return images, cubes, np.asarray(states, np.float32), joints


def make_frames(args, height: int, width: int) -> dict:
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    images, cubes, frame_seed, frame_index = [], [], [], []
    scene = Scene(args.task)
    t0 = time.perf_counter()
    for seed in tqdm(seeds, desc="reset frames", unit="seed"):
        img, cube = reset_frame(scene, seed, height, width)
        if seed == seeds[-1]:  # the re-used scene gives what a fresh environment gives
            fresh = reset_frame(Scene(args.task), seed, height, width)
            if not (np.array_equal(fresh[0], img) and np.array_equal(fresh[1], cube)):
                raise AssertionError("the re-used scene's reset frame differs from a fresh environment's")
        images.append(img)
        cubes.append(cube)
        frame_seed.append(seed)
        frame_index.append(0)
    t_reset = time.perf_counter() - t0
    roll_seeds = seeds[::args.rollout_every] if args.rollout_every > 0 else []
    t0 = time.perf_counter()
    for k, seed in enumerate(tqdm(roll_seeds, desc="rollout frames", unit="rollout")):
        imgs, cbs, states, joints = rollout_frames(scene, seed, height, width, ROLLOUT_FRAMES)
        if k == 0:  # the hand-written replay loop is sim.replay's: same states, bit for bit
            ref = sim.replay(args.task, sim.object_poses(args.task, seed), joints, sim.CONTROL_HZ // FPS, None)
            if not np.array_equal(ref.states, states):
                raise AssertionError("rollout_frames diverged from sim.replay")
        images += imgs
        cubes += cbs
        frame_seed += [seed] * len(imgs)
        frame_index += [i for i in ROLLOUT_FRAMES if i < len(states)]
    t_roll = time.perf_counter() - t0
    return {"images": np.asarray(images, np.uint8), "cube": np.asarray(cubes, np.float64),
            "seed": np.asarray(frame_seed), "frame": np.asarray(frame_index),
            "seconds_reset": t_reset, "seconds_rollout": t_roll}


# ---------------------------------------------------------------------------------------------- latents

@torch.no_grad()
def encode(vae, images: np.ndarray, height: int, width: int, batch: int, desc: str) -> torch.Tensor:
    """Normalised latents `[N, C, 1, h, w]` of single-frame clips, the encode stage's maths batched."""
    stream = StreamingEncoder(vae)
    stats = latent_stats(vae)
    out = []
    for i in tqdm(range(0, len(images), batch), desc=desc, unit="batch"):
        video = frames_to_video(images[i:i + batch], height, width)  # [3, B, H, W]
        stream.reset()
        mu = stream.encode(video.permute(1, 0, 2, 3)[:, :, None])  # B one-frame clips
        out.append(normalize_latents(mu, *stats))
    return torch.cat(out)


@torch.no_grad()
def raw_means(vae, images: np.ndarray, height: int, width: int, batch: int) -> torch.Tensor:
    stream = StreamingEncoder(vae)
    out = []
    for i in range(0, len(images), batch):
        stream.reset()
        out.append(stream.encode(frames_to_video(images[i:i + batch], height, width).permute(1, 0, 2, 3)[:, :, None]))
    return torch.cat(out)


def latent_scale(lat: torch.Tensor, vae) -> dict:
    """Scale of the normalised latents `[N, C, 1, h, w]`: overall, and per channel (over frames and cells)."""
    x = lat.double().transpose(0, 1).reshape(lat.shape[1], -1)
    mean_c, std_c = x.mean(1), x.std(1)
    mean_cfg, std_cfg = (np.asarray(v) for v in latent_stats(vae))
    q = lambda t: [round(float(v), 4) for v in np.quantile(t.numpy(), [0, 0.1, 0.5, 0.9, 1])]  # noqa: E731
    return {
        "overall_mean": float(x.mean()), "overall_std": float(x.std()),
        "overall_rms": float(x.pow(2).mean().sqrt()), "abs_max": float(x.abs().max()),
        "channel_mean_quantiles_0_10_50_90_100": q(mean_c),
        "channel_std_quantiles_0_10_50_90_100": q(std_c),
        "channels_std_in_0.5_2": int(((std_c >= 0.5) & (std_c <= 2)).sum()),
        "channels_abs_mean_gt_1": int((mean_c.abs() > 1).sum()),
        # what the raw encoder means look like, against the random config statistics
        "raw_channel_std_median": float(np.median((std_c.numpy() * std_cfg))),
        "raw_channel_mean_abs_median": float(np.median(np.abs(mean_c.numpy() * std_cfg + mean_cfg))),
        "config_std_range": [float(std_cfg.min()), float(std_cfg.max())],
        "config_mean_range": [float(mean_cfg.min()), float(mean_cfg.max())],
        # signal: how much each latent varies across frames (per cell), relative to its overall spread
        "frame_to_frame_std_over_total_std": float(lat.double().std(0).pow(2).mean().sqrt() / x.std()),
    }


# ---------------------------------------------------------------------------------------------- features

def pixel_features(images: np.ndarray, h: int | None, w: int | None) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if h is not None:
        x = F.interpolate(x, size=(h, w), mode="area")
    return x.reshape(len(x), -1).numpy()


def random_relu(cells: torch.Tensor, width: int, seed: int) -> np.ndarray:
    """Fixed random ReLU features of each cell `[N, D, h, w]` -> `[N, width*h*w]` (a 1x1 random layer)."""
    gen = torch.Generator().manual_seed(seed)
    n, d = cells.shape[:2]
    x = cells.double()
    x = (x - x.mean((0, 2, 3), keepdim=True)) / (x.std((0, 2, 3), keepdim=True) + 1e-6)
    w = torch.randn(width, d, generator=gen, dtype=torch.float64) / d ** 0.5
    b = torch.randn(width, generator=gen, dtype=torch.float64)
    y = torch.relu(torch.einsum("kd,ndhw->nkhw", w, x) + b[None, :, None, None])
    return y.reshape(n, -1).float().numpy()


def pixel_patches(images: np.ndarray, patch: int) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    n, c, hh, ww = x.shape
    x = x.reshape(n, c, hh // patch, patch, ww // patch, patch).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * patch * patch, hh // patch, ww // patch)


# ---------------------------------------------------------------------------------------------- probe

def gram(x: np.ndarray, train: np.ndarray, zscore: bool) -> np.ndarray:
    """`X X^T` over all frames after centring (and z-scoring) each feature with train statistics."""
    x = x.astype(np.float64, copy=True)
    x -= x[train].mean(0)
    if zscore:
        x /= x[train].std(0) + 1e-6 * (x[train].std(0).max() + 1e-12)
    return x @ x.T


def fit_predict(k: np.ndarray, tr: np.ndarray, te: np.ndarray, y: np.ndarray, lambdas) -> np.ndarray:
    """Ridge with an unpenalised intercept, dual form, for every lambda: predictions `[L, |te|, 2]`."""
    n = len(tr)
    ktt, kvt = k[np.ix_(tr, tr)], k[np.ix_(te, tr)]
    h = np.eye(n) - 1.0 / n
    kbar = ktt.mean(0)
    kc = h @ ktt @ h
    kvc = (kvt - kbar[None]) @ h
    evals, evecs = np.linalg.eigh(kc)
    evals = np.clip(evals, 0, None)
    ybar = y[tr].mean(0)
    proj = evecs.T @ (y[tr] - ybar)
    scale = kc.diagonal().mean()
    out = []
    for lam in lambdas:
        alpha = evecs @ (proj / (evals + lam * scale)[:, None])
        out.append(kvc @ alpha + ybar)
    return np.asarray(out)


def metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    err = pred - true
    sst = ((true - true.mean(0)) ** 2).sum(0)
    r2 = 1 - (err ** 2).sum(0) / sst
    dist = np.linalg.norm(err, axis=1) * 100
    return {"r2_x": float(r2[0]), "r2_y": float(r2[1]), "r2": float(r2.mean()),
            "rmse_x_cm": float(np.sqrt((err[:, 0] ** 2).mean()) * 100),
            "rmse_y_cm": float(np.sqrt((err[:, 1] ** 2).mean()) * 100),
            "median_err_cm": float(np.median(dist)), "p90_err_cm": float(np.quantile(dist, 0.9)),
            "frac_within_1cm": float((dist <= 1.0).mean()), "n": int(len(true))}


def probe(x: np.ndarray, y: np.ndarray, seeds: np.ndarray, train: np.ndarray, test: np.ndarray,
          groups: dict[str, np.ndarray]) -> dict:
    """Choose (centre | z-score, lambda) by grouped CV on train; refit on train; score test subsets."""
    train_seeds = np.unique(seeds[train])
    fold_of_seed = {s: i % FOLDS for i, s in enumerate(train_seeds)}
    fold = np.array([fold_of_seed.get(s, -1) for s in seeds])
    best: tuple[float, bool, int, np.ndarray] | None = None  # (CV RMSE, z-scored, lambda index, Gram matrix)
    cv = {}
    for zscore in (False, True):
        k = gram(x, train, zscore)
        sse = np.zeros(len(LAMBDAS))
        for f in range(FOLDS):
            tr, va = np.where(train & (fold != f))[0], np.where(fold == f)[0]
            p = fit_predict(k, tr, va, y, LAMBDAS)
            sse += ((p - y[va][None]) ** 2).sum((1, 2))
        rmse = np.sqrt(sse / (train.sum() * 2)) * 100
        cv["zscore" if zscore else "centre"] = [round(float(v), 3) for v in rmse]
        i = int(np.argmin(rmse))
        if best is None or rmse[i] < best[0]:
            best = (rmse[i], zscore, i, k)
    assert best is not None
    cv_rmse, zscore, i, k = best
    tr, te = np.where(train)[0], np.where(test)[0]
    pred = fit_predict(k, tr, te, y, LAMBDAS[i:i + 1])[0]
    pred_train = fit_predict(k, tr, tr, y, LAMBDAS[i:i + 1])[0]
    res = {"features": int(x.shape[1]), "scaling": "zscore" if zscore else "centre",
           "lambda_rel": float(LAMBDAS[i]), "cv_rmse_cm": float(cv_rmse),
           "lambda_at_grid_edge": i in (0, len(LAMBDAS) - 1),
           "train": metrics(pred_train, y[tr])}
    for name, mask in groups.items():
        sel = mask[te]
        if sel.any():
            res[name] = metrics(pred[sel], y[te][sel])
    res["_pred"] = pred
    return res


def baseline(y, train, test, groups) -> dict:
    te = np.where(test)[0]
    pred = np.repeat(y[train].mean(0, keepdims=True), len(te), 0)
    return {name: metrics(pred[mask[te]], y[te][mask[te]]) for name, mask in groups.items() if mask[te].any()}


# ---------------------------------------------------------------------------------------------- report

def plot(path: Path, y_test: np.ndarray, preds: dict[str, np.ndarray], mid: np.ndarray, sample: np.ndarray) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(preds)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, axis, label in ((axes[0], 0, "x"), (axes[1], 1, "y")):
        t = y_test[:, axis] * 100
        lo, hi = t.min() - 2, t.max() + 2
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
        for name, marker in zip(names, ("o", "s", "^", "v")):
            p = preds[name][:, axis] * 100
            ax.scatter(t[~mid], p[~mid], s=10, marker=marker, alpha=0.6, label=f"{name} (reset)")
            ax.scatter(t[mid], p[mid], s=14, marker=marker, alpha=0.9, facecolors="none",
                       edgecolors=ax.collections[-1].get_facecolor()[0], label=f"{name} (mid-episode)")
        ax.set_xlabel(f"true cube {label} (cm)")
        ax.set_ylabel(f"predicted cube {label} (cm)")
        ax.set_title(f"held-out seeds: cube {label}")
        ax.set_xlim(lo, hi), ax.set_ylim(lo, hi)
        ax.legend(fontsize=7)
    axes[2].imshow(sample)
    axes[2].set_title("top camera at the small preset's 192x256 (reset | mid-episode)")
    axes[2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fmt_row(name: str, m: dict | None) -> str:
    if m is None:
        return f"| {name} | - | - | - | - | - | - |"
    return (f"| {name} | {m['r2']:.4f} | {m['r2_x']:.3f} / {m['r2_y']:.3f} | "
            f"{m['rmse_x_cm']:.2f} / {m['rmse_y_cm']:.2f} | {m['median_err_cm']:.2f} | {m['p90_err_cm']:.2f} | "
            f"{100 * m['frac_within_1cm']:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--task", default="AlohaTransferCube-v0", choices=["AlohaTransferCube-v0"],
                    help="sim task (the cube task: the probe's target is the cube's x, y)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seeds", type=int, default=400, help="episode seeds (one reset frame each)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--test", type=int, default=100, help="held-out seeds: the last ones")
    ap.add_argument("--rollout-every", type=int, default=10,
                    help=f"scripted rollout for every k-th seed, frames {ROLLOUT_FRAMES} of it (0: none)")
    ap.add_argument("--vae-seeds", type=int, nargs="+", default=[0, 1],
                    help="random VAE weights to probe (0 is the encode stage's default)")
    ap.add_argument("--vae-config", default=None,
                    help="JSON of VAEConfig fields replacing the preset's (e.g. '{\"base_dim\": 64}')")
    ap.add_argument("--batch", type=int, default=32, help="frames per VAE call")
    ap.add_argument("--cache", default=None,
                    help="npz of rendered frames to reuse/write (same args), latents beside it")
    ap.add_argument("--out", default="bench/results/vae_probe", help="writes OUT.json, OUT.md, OUT.png")
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    preset = PRESETS[args.preset]
    cam = preset.cameras[0]
    vae_cfg = preset.vae
    if args.vae_config:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in json.loads(args.vae_config).items()}
        vae_cfg = dataclasses.replace(vae_cfg, **fields)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # frames
    if args.cache and Path(args.cache).is_file():
        data = dict(np.load(args.cache))
        print(f"frames from {args.cache}: {len(data['images'])}")
    else:
        data = make_frames(args, cam.height, cam.width)
        if args.cache:
            np.savez(args.cache, **data)
    images, cube, seeds, frame = data["images"], data["cube"], data["seed"], data["frame"]
    y = cube[:, :2]
    test_seeds = set(range(args.first_seed + args.seeds - args.test, args.first_seed + args.seeds))
    test = np.array([s in test_seeds for s in seeds])
    train = ~test
    mid = frame > 0
    groups = {"test_all": np.ones(len(y), bool), "test_reset": ~mid, "test_mid": mid}
    print(f"{len(y)} frames ({(~mid).sum()} reset, {mid.sum()} mid-episode); "
          f"{train.sum()} train / {test.sum()} test frames")

    results: dict = {"baseline_mean": baseline(y, train, test, groups), "probes": {}, "latent_scale": {}}
    preds = {}
    timings = {"render_reset_s": float(data["seconds_reset"]), "render_rollout_s": float(data["seconds_rollout"])}

    # pixels
    t0 = time.perf_counter()
    pixel_sets = {"pixels 48x64 RGB": (48, 64), "pixels 36x48 RGB": (36, 48),
                  f"pixels {cam.height}x{cam.width} RGB (full)": (None, None)}
    for name, (h, w) in tqdm(pixel_sets.items(), desc="pixel probes"):
        r = probe(pixel_features(images, h, w), y, seeds, train, test, groups)
        preds[name] = r.pop("_pred")
        results["probes"][name] = r
    name = "pixels 16x16 patches, random ReLU x256 (control)"
    r = probe(random_relu(pixel_patches(images, 16), 256, seed=0), y, seeds, train, test, groups)
    preds[name] = r.pop("_pred")
    results["probes"][name] = r
    timings["pixel_probes_s"] = time.perf_counter() - t0

    # latents
    for vs in args.vae_seeds:
        vae = build_vae(vae_cfg, seed=vs)
        if vs == args.vae_seeds[0]:
            ref = VideoEncoder(vae, 8)(images[:1], cam)  # the encode stage's encoder on a 1-frame clip
        t0 = time.perf_counter()
        key = hashlib.sha1(json.dumps([dataclasses.asdict(vae_cfg), vs, len(images)]).encode()).hexdigest()[:12]
        lat_path = Path(args.cache).with_suffix(f".latents-{key}.pt") if args.cache else None
        if lat_path is not None and lat_path.is_file():
            lat = torch.load(lat_path)
            print(f"latents from {lat_path}")
        else:
            lat = encode(vae, images, cam.height, cam.width, args.batch, f"encode VAE seed {vs}")
            if lat_path is not None:
                torch.save(lat, lat_path)
        timings[f"encode_vae{vs}_s"] = time.perf_counter() - t0
        if vs == args.vae_seeds[0]:
            diff = float((lat[0] - ref).abs().max())
            results["batched_vs_VideoEncoder_max_abs_diff"] = diff
            if diff > 1e-4:
                raise AssertionError(f"batched encoding differs from VideoEncoder by {diff}")
        results["latent_shape_per_frame"] = list(lat.shape[1:])
        results["latent_scale"][f"vae seed {vs}"] = latent_scale(lat, vae)
        t0 = time.perf_counter()
        name = f"latents VAE seed {vs}"
        r = probe(lat.reshape(len(lat), -1).numpy(), y, seeds, train, test, groups)
        preds[name] = r.pop("_pred")
        results["probes"][name] = r
        name = f"latents VAE seed {vs}, random ReLU x256 per cell"
        r = probe(random_relu(lat[:, :, 0], 256, seed=0), y, seeds, train, test, groups)
        preds[name] = r.pop("_pred")
        results["probes"][name] = r
        timings[f"probe_vae{vs}_s"] = time.perf_counter() - t0
        del vae

    total = time.perf_counter() - t_start
    timings["total_s"] = total
    y_test = y[test]
    lat0, pix = f"latents VAE seed {args.vae_seeds[0]}", "pixels 48x64 RGB"
    sample = np.concatenate([images[np.where(~mid)[0][0]], np.full((cam.height, 4, 3), 255, np.uint8),
                             images[np.where(mid & (frame == ROLLOUT_FRAMES[1]))[0][0]]
                             if mid.any() else images[1]], axis=1)
    plot(out.with_suffix(".png"), y_test, {lat0: preds[lat0], pix: preds[pix]}, mid[test], sample)

    p = results["probes"]
    ratios = {f"{name} / {pix} (test_all median err)": p[name]["test_all"]["median_err_cm"] / p[pix]["test_all"]["median_err_cm"]
              for name in p if name.startswith("latents")}
    results["ratios_latent_over_pixel_median_err"] = ratios
    # median error (cm) on the held-out frames of each episode frame index (0: reset)
    ft = frame[test]
    results["median_err_cm_by_frame"] = {
        name: {int(i): float(np.median(np.linalg.norm(pr[ft == i] - y_test[ft == i], axis=1)) * 100)
               for i in np.unique(ft)} for name, pr in preds.items()}
    results["cube_moved_cm_by_frame"] = {
        int(i): float(np.median(np.linalg.norm(y[frame == i] - np.stack([y[(seeds == s_) & (frame == 0)][0]
                                                                          for s_ in seeds[frame == i]]), axis=1)) * 100)
        for i in np.unique(frame)}
    results.update({
        "command": "MUJOCO_GL=egl python " + " ".join(shlex.quote(a) for a in sys.argv),
        "args": vars(args), "task": args.task, "preset": args.preset,
        "camera": dataclasses.asdict(cam), "vae_config": dataclasses.asdict(vae_cfg),
        "vae_encoder_params": int(sum(t.numel() for t in build_vae(vae_cfg, 0).encoder.parameters())),
        "frames": {"total": int(len(y)), "reset": int((~mid).sum()), "mid_episode": int(mid.sum()),
                   "train": int(train.sum()), "test": int(test.sum()), "rollout_frames": list(ROLLOUT_FRAMES),
                   "cube_x_range_cm": [float(y[:, 0].min() * 100), float(y[:, 0].max() * 100)],
                   "cube_y_range_cm": [float(y[:, 1].min() * 100), float(y[:, 1].max() * 100)]},
        "timings_s": timings,
        "env": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.machine(), "processor": platform.processor()},
    })
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(out, results, args)
    print(out.with_suffix(".md").read_text())


def verdict(res: dict) -> list[str]:
    """The verdict, computed from this run's numbers (thresholds from the brief: R² >= 0.9 and
    median error <= 2 cm, near the pixels'; the gripper needs ~1 cm at the grasp)."""
    p = res["probes"]
    pixels = {n: r for n, r in p.items() if n.startswith("pixels") and "control" not in n}
    best_pix = min(pixels, key=lambda n: pixels[n]["test_all"]["median_err_cm"])
    ref = "pixels 48x64 RGB"  # as many features as the latent: the like-for-like reference
    rp, bp = p[ref]["test_all"], pixels[best_pix]["test_all"]
    lats = [n for n in p if n.startswith("latents") and "ReLU" not in n]
    ok = []
    out = [f"Reference: {ref} (same 9216 features as the latent) R² {rp['r2']:.3f}, median error "
           f"{rp['median_err_cm']:.2f} cm, {100 * rp['frac_within_1cm']:.0f}% within 1 cm; best pixel probe {best_pix}: "
           f"R² {bp['r2']:.3f}, {bp['median_err_cm']:.2f} cm, {100 * bp['frac_within_1cm']:.0f}% within 1 cm.", ""]
    for n in lats:
        r = p[n]
        a, z = r["test_all"], r["test_reset"]
        ratio = a["median_err_cm"] / rp["median_err_cm"]
        good = a["r2"] >= 0.9 and a["median_err_cm"] <= 2.0 and ratio <= 1.5
        ok.append(good)
        nl = p[f"{n}, random ReLU x256 per cell"]["test_all"]
        out.append(f"- **{n}**: held-out R² {a['r2']:.3f} (reset frames {z['r2']:.3f}), median error "
                   f"{a['median_err_cm']:.2f} cm (reset {z['median_err_cm']:.2f} cm), p90 {a['p90_err_cm']:.2f} cm, "
                   f"{100 * a['frac_within_1cm']:.0f}% within 1 cm; {ratio:.2f}x the 48x64 pixel probe's median error "
                   f"(random-ReLU read-out: R² {nl['r2']:.3f}, {nl['median_err_cm']:.2f} cm) -> "
                   f"**{'keeps' if good else 'does not keep'}** the cube position (test: R² >= 0.9, median <= 2 cm, "
                   "<= 1.5x the 48x64 pixels).")
    scale = []
    for n, st in res["latent_scale"].items():
        cs = st["channel_std_quantiles_0_10_50_90_100"]
        scale.append(f"{n}: overall std {st['overall_std']:.3f}, per-channel std {cs[0]:.3f}..{cs[4]:.3f} "
                     f"(median {cs[2]:.3f}), {st['channels_std_in_0.5_2']}/{res['latent_shape_per_frame'][0]} "
                     f"channels with std in [0.5, 2], frame-to-frame variation {st['frame_to_frame_std_over_total_std']:.3f} "
                     "of the total")
    out.append("- Latent scale: " + "; ".join(scale) + ". The config's `latents_mean/latents_std` are random draws "
               "(means ±0.3, stds 0.4..1.6) that do not match what this random encoder outputs, so the normalised "
               "latents are not unit-scale: the per-channel offsets dominate and the part that changes between "
               "frames is a small fraction of unit noise.")
    if all(ok):
        out.append("- **Verdict: the random-VAE latents keep the cube's position** about as well as pixels of the same "
                   "size, for every VAE seed tried. Random weights pass issue 12's probe; the latent normalisation "
                   "should still be measured on the demo frames so the latents are unit-scale.")
    elif any(ok):
        out.append("- **Verdict: it depends on the random draw.** Some VAE seeds keep the cube's position (at or better "
                   "than pixels of the same size, sub-centimetre at reset), others lose it for a linear read-out "
                   "(a random ReLU read-out recovers part of it, not to 1 cm). The `small` preset's random VAE is "
                   "therefore not acceptable as it stands (the encode stage's default seed is 0): a policy's VAE must "
                   "be one that passes this probe, i.e. pin a seed that passes and record it (and this probe) in the "
                   "lineage, or train the VAE on the demo frames as the issue's fallback says. Either way measure "
                   "`latents_mean/latents_std` on the demo frames: with the random config statistics the normalised "
                   "latents vary by only ~0.06 per channel, far below the unit noise of flow matching.")
    else:
        out.append("- **Verdict: the random-VAE latents lose too much of the cube's position** against pixels of the "
                   "same size for every VAE seed tried: train the VAE (issue 12's fallback) or change its size.")
    return out


def write_markdown(out: Path, res: dict, args) -> None:
    p, base = res["probes"], res["baseline_mean"]
    fr = res["frames"]
    lines = [
        "# Random-VAE latents against pixels: a linear probe of the cube's position",
        "",
        f"`bench/vae_probe.py`, task {res['task']}, preset `{res['preset']}` (top camera "
        f"{res['camera']['height']}x{res['camera']['width']}), VAE {res['vae_config']} with random weights "
        f"({res['vae_encoder_params'] / 1e6:.2f} M encoder parameters), latent {res['latent_shape_per_frame']} per frame.",
        "",
        "```",
        res["command"],
        "```",
        "",
        f"Frames: {fr['total']} ({fr['reset']} reset frames, one per seed {args.first_seed}..{args.first_seed + args.seeds - 1}, "
        f"and {fr['mid_episode']} mid-episode frames {fr['rollout_frames']} of the scripted expert's replay of every "
        f"{args.rollout_every}th seed); train {fr['train']} / test {fr['test']} frames, split by seed "
        f"(the last {args.test} seeds are held out). Cube x {fr['cube_x_range_cm'][0]:.1f}..{fr['cube_x_range_cm'][1]:.1f} cm, "
        f"y {fr['cube_y_range_cm'][0]:.1f}..{fr['cube_y_range_cm'][1]:.1f} cm (world frame). Ridge strength and "
        "centring/z-scoring chosen by 5-fold CV grouped by seed on the train seeds; every number below is on the "
        "held-out seeds. Batched encoding matches the encode stage's `VideoEncoder` to "
        f"{res['batched_vs_VideoEncoder_max_abs_diff']:.1e} (max abs).",
        "",
    ]
    for group, title in (("test_all", "all held-out frames"), ("test_reset", "held-out reset frames"),
                         ("test_mid", "held-out mid-episode frames (approach, grasp, lift, carry)")):
        lines += [f"## {title}", "",
                  "| features | R² (mean) | R² x / y | RMSE x / y (cm) | median err (cm) | p90 err (cm) | within 1 cm |",
                  "| --- | --- | --- | --- | --- | --- | --- |",
                  fmt_row("baseline: train mean", base.get(group))]
        for name, r in p.items():
            lines.append(fmt_row(f"{name} ({r['features']} feats)", r.get(group)))
        lines.append("")
    lines += ["Probe settings (CV): " + "; ".join(
        f"{n}: {r['scaling']}, λ={r['lambda_rel']:.0e}{' (grid edge)' if r['lambda_at_grid_edge'] else ''}, "
        f"CV RMSE {r['cv_rmse_cm']:.2f} cm, train R² {r['train']['r2']:.4f}" for n, r in p.items()), ""]
    lines += ["Latent / pixel (48x64 RGB) median-error ratios, same run: " + "; ".join(
        f"{k.split(' / ')[0]}: {v:.2f}x" for k, v in res["ratios_latent_over_pixel_median_err"].items()), ""]
    byf = res["median_err_cm_by_frame"]
    idx = sorted({int(i) for v in byf.values() for i in v})
    lines += ["## Median error (cm) by episode frame, held-out seeds", "",
              "Frame 0 is the reset; " + ", ".join(f"frame {i}: cube moved {res['cube_moved_cm_by_frame'][i]:.1f} cm"
                                                  for i in idx if i) +
              " (median, from its reset position; it is on the table until ~frame 21, then lifted and carried). "
              "Mid-episode y hardly varies (the carry runs along y = 50 cm), so R² of y there is not meaningful: "
              "read the cm errors.", "",
              "| features | " + " | ".join(f"frame {i}" for i in idx) + " |",
              "| --- |" + " --- |" * len(idx)]
    for name, v in byf.items():
        lines.append(f"| {name} | " + " | ".join(f"{v[i]:.2f}" if i in v else "-" for i in idx) + " |")
    lines.append("")
    lines += ["## Scale of the normalised latents", "",
              "| VAE | overall mean | overall std | abs max | channel std q0/q10/q50/q90/q100 | "
              "channel mean q0/q50/q100 | channels std in [0.5, 2] | frame-to-frame std / total std |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in res["latent_scale"].items():
        cs, cm = s["channel_std_quantiles_0_10_50_90_100"], s["channel_mean_quantiles_0_10_50_90_100"]
        lines.append(f"| {name} | {s['overall_mean']:.3f} | {s['overall_std']:.3f} | {s['abs_max']:.2f} | "
                     f"{' / '.join(f'{v:.3f}' for v in cs)} | {cm[0]:.2f} / {cm[2]:.2f} / {cm[4]:.2f} | "
                     f"{s['channels_std_in_0.5_2']} of {res['latent_shape_per_frame'][0]} | "
                     f"{s['frame_to_frame_std_over_total_std']:.3f} |")
    lines += ["", "![predicted against true cube position on held-out seeds](" + out.with_suffix(".png").name + ")", ""]
    t = res["timings_s"]
    lines += [f"Timings on this machine ({res['env']['threads']} torch threads): " +
              ", ".join(f"{k} {v:.0f}" for k, v in t.items()) + " s" +
              (" (frames and latents read from `--cache`, made by an earlier run of the same command: the "
               "render timings are that run's, the encode timings are loading)." if args.cache else "."), ""]
    lines += ["## Verdict", ""] + verdict(res) + [""]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
