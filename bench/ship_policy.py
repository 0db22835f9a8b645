"""The trained `small` ALOHA policy as the folder shipped with the code (`make ship-policy`).

    python bench/ship_policy.py --work outputs/pa5 --dest checkpoints/small-aloha \\
        --code-commit 270e326... --code-note "..." --data-archive outputs/pa3_data.tar.xz

Reads the work folder of `bench/policy_aloha.py` (its trained checkpoint, base.json, base_stats.json,
timings.json, the training run's MLflow files) and bench/results/policy_aloha.json, and writes
`models.checkpoint.ship_checkpoint`'s folder: the transformer (bf16, one file) and policy.json,
shipped.json (what rebuilds the VAE and text encoder, and every weights file's sha256) and
lineage.json (the commands, code, data, training run and held-out evaluation that made it). The
encoders must be those in base.json (the ones the data was encoded with) and the folder at most
SHIP_LIMIT_BYTES, or nothing is written. `vaops demo` starts from the folder when it is there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHIP_LIMIT_BYTES = 50 * 10**6  # what the repository carries of a policy (issue 12)


def _shown(path: Path) -> str:
    path = Path(path).absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def trained_checkpoint(work: Path) -> Path:
    """The final checkpoint of the work folder's training run (train/outputs.json)."""
    outputs = work / "train" / "outputs.json"
    if not outputs.is_file():
        raise SystemExit(f"{outputs}: no finished training run in {work}")
    return work / "train" / "checkpoints" / Path(json.loads(outputs.read_text())["checkpoint"]).name


def _run_tag(work: Path, run_id: str, *names: str) -> str | None:
    """A tag of the training run in the work folder's MLflow file store."""
    for name in names:
        for tag in sorted(work.glob(f"mlruns/*/{run_id}/tags/{name}")):
            return tag.read_text().strip()
    return None


def demo_seeds(work: Path, archive: Path | None) -> dict[str, str] | None:
    """Seed range per task of the demonstrations the latents were made from: the encoded dataset's
    episodes.jsonl, in the work folder or in the data archive (`encoded/` packed as .tar.xz)."""
    name = "encoded/meta/episodes.jsonl"
    if (work / name).is_file():
        text = (work / name).read_text()
    elif archive is not None:
        with tarfile.open(archive) as tar:
            member = tar.extractfile(name)
            if member is None:
                return None
            text = member.read().decode()
    else:
        return None
    seeds: dict[str, list[int]] = {}
    for line in text.splitlines():
        row = json.loads(line)
        seeds.setdefault(row["tasks"][0], []).append(row["seed"])
    return {task: f"{min(s)}-{max(s)} ({len(s)} episodes)" for task, s in seeds.items()}


def summary(tasks: dict) -> str | None:
    """One line on the held-out evaluation (the released sampling): successes per task."""
    parts = [f"{task} {r['successes']}/{r['episodes']} ({r['success_rate']:.0%}, Wilson 95% "
             f"{r['wilson95'][0]:.0%}-{r['wilson95'][1]:.0%})" for task, r in tasks.items()]
    return f"solves {', '.join(parts)} held-out episodes in closed loop" if parts else None


def lineage(a: argparse.Namespace, ckpt: Path) -> dict:
    """How the policy was made: the commands, the code, the data, the training run and its held-out
    evaluation."""
    from vaops.models.checkpoint import file_sha256

    w = a.work
    state = json.loads((ckpt / "trainer_state.json").read_text())
    results = json.loads((RESULTS / "policy_aloha.json").read_text())
    timings = json.loads((w / "timings.json").read_text()) if (w / "timings.json").is_file() else {}
    stats = json.loads((w / "base_stats.json").read_text()) if (w / "base_stats.json").is_file() else {}
    commit = _run_tag(w, state["run_id"], "mlflow.source.git.commit", "vaops.git_commit")
    code = ({"commit": commit, "source": "the training run's MLflow tag"} if commit else
            {"commit": a.code_commit or "unknown", "source": a.code_note or "not recorded"})
    archive = Path(a.data_archive) if a.data_archive else None
    command = (f"python bench/ship_policy.py --work {_shown(w)} --dest {_shown(a.dest)}"
               + (f" --code-commit {a.code_commit}" if a.code_commit else "")
               + (f" --data-archive {_shown(archive)}" if archive else ""))
    return {
        "policy": "LingBot-VA `small` (21.7 M parameters) trained from scratch on scripted-expert ALOHA sim "
                  "demonstrations of AlohaTransferCube-v0 and AlohaInsertion-v0",
        "summary": summary(results.get("variants", {}).get("sync", {})),
        "checkpoint": _shown(ckpt),
        "code": code,
        "data": {
            "demonstrations": "scripted expert (`vaops demos --preset small`): 192x256 top camera, 49 frames at "
                              "10 fps, one task-text segment per episode",
            "episodes_per_task": timings.get("demos", {}).get("episodes_per_task"),
            "seeds": demo_seeds(w, archive),
            "stages": "validate (aloha) -> clean (aloha-full) -> augment (photometric, 0 copies) -> encode "
                      "(the base's VAE and text encoder)",
            "encoded_archive": {"path": _shown(archive), "sha256": file_sha256(archive)} if archive else None,
            "vae_latent_stats": {"fitted_on_frames": stats.get("frames"), "vae_seed": stats.get("vae_seed")},
        },
        "training": {"run_id": state["run_id"], "steps": state["step"], "final_loss": results.get("final_loss"),
                     "seconds": timings.get("train", {}).get("seconds"), "gpu": timings.get("train", {}).get("gpu"),
                     "config": state["config"]},
        "evaluation": {"protocol": "closed loop through `vaops serve` (fp32 on CPU), held-out seeds 10000 + "
                                   "episode, at most 100 actions at 10 fps per episode",
                       "results": results.get("variants"), "report": "bench/results/policy_aloha.md"},
        "commands": [*results.get("command", []), command],
    }


def ship(a: argparse.Namespace) -> Path:
    from vaops.models.checkpoint import ENCODER_WEIGHTS, read_shipped, ship_checkpoint

    w = a.work
    ckpt = trained_checkpoint(w)
    dest = ship_checkpoint(ckpt, a.dest, lineage(a, ckpt))
    hashes = read_shipped(dest)["sha256"]
    base = json.loads((w / "base.json").read_text()) if (w / "base.json").is_file() else {}
    differ = [name for name in ENCODER_WEIGHTS if base and base.get(name) != hashes[name]]
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    if differ or size > SHIP_LIMIT_BYTES:
        shutil.rmtree(dest)
        raise SystemExit(f"{ckpt}: not shipped: " + (
            f"its encoders {differ} are not those of {w / 'base.json'}" if differ
            else f"{size / 1e6:.1f} MB is more than {SHIP_LIMIT_BYTES / 1e6:g} MB"))
    print(f"shipped {ckpt} as {dest} ({size / 1e6:.1f} MB)")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "pa5", help="bench/policy_aloha.py's work folder")
    p.add_argument("--dest", type=Path, default=ROOT / "checkpoints" / "small-aloha", help="the folder to write")
    p.add_argument("--code-commit", help="the code's commit, where the training run recorded none")
    p.add_argument("--code-note", help="how --code-commit is known")
    p.add_argument("--data-archive", help="the encoded data, packed (its path and sha256 go into the lineage)")
    a = p.parse_args(argv)
    a.work = a.work.absolute()
    ship(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
