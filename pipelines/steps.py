"""Kubeflow components that exist only to wire the pipeline: they pick where the data and the base
model come from and list the evaluation shards. The stages themselves are components/<stage>/."""

from kfp import dsl

from vaops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def dataset_source(dataset: dsl.Output[dsl.Dataset], dvc_repo: str = "", dvc_path: str = "data/demos",
                   dvc_rev: str = "", task: str = "", episodes: int = 4, first_seed: int = 0,
                   time_scale: float = 0.0, preset: str = "tiny", workers: int = 0) -> int:
    """The training data: `dvc_path` of the git+DVC repository `dvc_repo` at `dvc_rev` when a
    repository is given (fetched from its DVC cache or remote), else scripted-expert demonstrations
    recorded in the ALOHA sim with the demos settings named after the model `preset` where there are
    some (`small`: both tasks, one task-text segment per episode), else the defaults, at the preset's
    camera size and rate; `task` (comma-separated), `time_scale` and `workers` override them when set.
    The data's lineage goes into the dataset's metadata["lineage"] (the register step tags the model
    version with it); returns the episode count."""
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")
    if dvc_repo:
        from dvc.api import DVCFileSystem

        from vaops.components.ingest.config import IngestConfig
        from vaops.components.ingest.stage import run

        result = run(IngestConfig(source=dvc_path, output=dataset.path, repo=dvc_repo, rev=dvc_rev or None))
        fs = DVCFileSystem(dvc_repo, rev=dvc_rev or None)
        # The commit, not the name given: a branch or tag moves, the lineage must not.
        commit = fs.repo.scm.get_rev() if dvc_rev else "workspace"
        lineage = {"vaops.data_repo": dvc_repo, "vaops.data_path": dvc_path,
                   "vaops.data_md5": str(fs.info(dvc_path).get("md5") or "unknown"), "vaops.data_git_rev": commit}
        dataset.metadata.update({"source": "dvc", "source_version": result.source_version,
                                 "episodes": result.episodes, "frames": result.frames, "lineage": lineage})
        return result.episodes

    import dataclasses

    from vaops.components.demos.config import PRESETS, for_model_preset
    from vaops.components.demos.stage import run as record

    base = PRESETS.get(preset, PRESETS["default"])
    cfg = dataclasses.replace(base, output=dataset.path, episodes=episodes, first_seed=first_seed,
                              task=task or base.task, time_scale=time_scale or base.time_scale,
                              workers=workers or base.workers)
    demos = record(for_model_preset(cfg, preset))
    lineage = {"vaops.data_path": f"sim:{cfg.task}", "vaops.data_seeds": ",".join(map(str, demos.seeds))}
    dataset.metadata.update({"source": "sim", "episodes": demos.episodes, "task": cfg.task, "lineage": lineage})
    return demos.episodes


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def base_model(model: dsl.Output[dsl.Model], base_checkpoint: str = "", preset: str = "tiny", seed: int = -1,
               tracking_uri: str = "", calibration_data: dsl.Input[dsl.Dataset] = None) -> str:
    """The checkpoint training starts from and whose VAE and text encoder encode the data:
    `base_checkpoint` (a folder the step can read, or models:/name@alias in the MLflow registry),
    else random weights of a from-scratch preset (tiny, small; `seed` -1: the preset's own), whose
    VAE's latent statistics are fitted on `calibration_data` when given. Returns its preset."""
    import os
    import shutil
    from pathlib import Path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from vaops.models.atomic import link_or_copy
    from vaops.models.checkpoint import POLICY_FILE, read_preset, write_random_checkpoint
    from vaops.models.config import RANDOM_INIT_PRESETS, get_preset
    from vaops.models.model_source import WEIGHT_PARTS, resolve_checkpoint

    out = Path(model.path)
    if not base_checkpoint:
        if preset not in RANDOM_INIT_PRESETS:
            raise ValueError(f"preset {preset!r} needs base_checkpoint (a released checkpoint folder or a "
                             f"models:/ URI); only {', '.join(RANDOM_INIT_PRESETS)} start from random weights")
        write_random_checkpoint(out, preset, seed=None if seed < 0 else seed)
        source = f"random {preset} (seed {get_preset(preset).init_seed if seed < 0 else seed})"
        if calibration_data is not None:
            from vaops.components.encode.calibrate import calibrate_vae
            from vaops.models.vae import load_vae, save_vae

            vae = load_vae(out / "vae")
            fitted = calibrate_vae(vae, calibration_data.path, get_preset(preset))
            save_vae(vae, out / "vae")
            source += f", VAE latent statistics fitted on {fitted['frames']} frames"
        model.metadata.update({"source": source, "preset": preset})
        return preset

    # A registry version is downloaded once into the model cache (serving's), then linked from there.
    folder = resolve_checkpoint(base_checkpoint)
    found = read_preset(folder).name
    if found != preset:
        raise ValueError(f"{base_checkpoint}: a {found!r} checkpoint, but the pipeline's preset is {preset!r}")
    out.mkdir(parents=True)
    for part in WEIGHT_PARTS:
        shutil.copytree(folder / part, out / part, copy_function=link_or_copy)
    link_or_copy(str(folder / POLICY_FILE), str(out / POLICY_FILE))
    model.metadata.update({"source": base_checkpoint, "preset": found})
    return found


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def shard_names(count: int) -> list[str]:
    """The shard names `i/count` the evaluation fans out over."""
    if count < 1:
        raise ValueError(f"the shard count must be >= 1, got {count}")
    return [f"{i}/{count}" for i in range(count)]
