"""Kubeflow component of `vaops ingest` (lightweight Python component)."""

from kfp import dsl

from vaops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest(source: str, dataset: dsl.Output[dsl.Dataset], repo: str = "", rev: str = "") -> int:
    """A LeRobot dataset (a path the step can read, or a path in a git+DVC repo at `rev`)
    normalised to v3.0 with `action_config`; returns the episode count."""
    from vaops.components.ingest.config import IngestConfig
    from vaops.components.ingest.stage import run

    result = run(IngestConfig(source=source, output=dataset.path, repo=repo or None, rev=rev or None))
    dataset.metadata.update({"source": source, "source_version": result.source_version,
                             "episodes": result.episodes, "frames": result.frames, "broken": result.broken,
                             "notes": result.notes})
    return result.episodes
