"""Kubeflow component of `vaops augment` (lightweight Python component)."""

from kfp import dsl

from vaops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def augment(dataset: dsl.Input[dsl.Dataset], augmented: dsl.Output[dsl.Dataset], report: dsl.Output[dsl.Artifact],
            summary: dsl.Output[dsl.Markdown], preset: str = "default", copies: int = -1) -> int:
    """Keep the originals and append augmented copies of each, drawn as the named preset says (default,
    photometric, strong); `copies`, unless negative, replaces the preset's count (-1 rather than None:
    kfp.local casts an integer parameter with int()). Returns the episode count."""
    import dataclasses
    import shutil

    from vaops.components.augment.config import PRESETS
    from vaops.components.augment.stage import run

    if preset not in PRESETS:
        raise ValueError(f"augment preset {preset!r}: choose one of {sorted(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[preset], dataset=dataset.path, output=augmented.path, report_dir=report.path)
    result = run(dataclasses.replace(cfg, copies=copies) if copies >= 0 else cfg)
    shutil.copyfile(f"{report.path}/report.md", summary.path)
    total = result.originals + len(result.augmented)
    augmented.metadata.update({"episodes": total, "originals": result.originals})
    return total
