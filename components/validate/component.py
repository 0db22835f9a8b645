"""Kubeflow component of `vaops validate` (lightweight Python component)."""

from kfp import dsl

from vaops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def validate(dataset: dsl.Input[dsl.Dataset], report: dsl.Output[dsl.Artifact],
             summary: dsl.Output[dsl.Markdown], metrics: dsl.Output[dsl.Metrics], fps: int = 0,
             action_dim: int = 0, state_dim: int = 0, min_usable_fraction: float = 0.5) -> bool:
    """Check the dataset (0 = no requirement); fails the step when it is unusable."""
    import shutil

    from vaops.components.step_outputs import save_metrics
    from vaops.components.validate.config import ValidateConfig
    from vaops.components.validate.stage import run

    result = run(ValidateConfig(dataset=dataset.path, report_dir=report.path, fps=fps or None,
                                action_dim=action_dim or None, state_dim=state_dim or None,
                                min_usable_fraction=min_usable_fraction))
    shutil.copyfile(f"{report.path}/report.md", summary.path)
    for name in ("episodes", "frames", "passed", "quarantined"):
        metrics.log_metric(name, result.as_dict()[name])
    save_metrics(metrics)
    if not result.usable:
        raise RuntimeError(f"dataset unusable: {[p.message for p in result.dataset_problems]}")
    return result.usable
