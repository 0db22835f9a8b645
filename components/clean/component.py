"""Kubeflow component of `vaops clean` (lightweight Python component)."""

from kfp import dsl

from vaops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def clean(dataset: dsl.Input[dsl.Dataset], validation_report: dsl.Input[dsl.Artifact],
          cleaned: dsl.Output[dsl.Dataset], report: dsl.Output[dsl.Artifact], summary: dsl.Output[dsl.Markdown],
          preset: str = "default") -> int:
    """Drop quarantined, failed, duplicate, short and static episodes, trim, clip and map grippers, as
    the named preset says (components/clean/config.py); returns the number of episodes kept."""
    import dataclasses
    import shutil

    from vaops.components.clean.config import PRESETS
    from vaops.components.clean.stage import run

    cfg = dataclasses.replace(PRESETS[preset], dataset=dataset.path, output=cleaned.path, report_dir=report.path,
                              validation_report=validation_report.path)
    result = run(cfg)
    shutil.copyfile(f"{report.path}/report.md", summary.path)
    cleaned.metadata.update({"episodes": result.kept, "dropped": sorted(result.dropped)})
    return result.kept
