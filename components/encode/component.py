"""Kubeflow component of `vaops encode` (lightweight Python component; GPU image for real weights)."""

from kfp import dsl

from vaops.components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def encode(dataset: dsl.Input[dsl.Dataset], encoded: dsl.Output[dsl.Dataset], report: dsl.Output[dsl.Artifact],
           metrics: dsl.Output[dsl.Metrics], base_checkpoint: dsl.Input[dsl.Model] = None, preset: str = "tiny",
           robot: str = "aloha", checkpoint: str = "", device: str = "cpu", dtype: str = "float32") -> int:
    """Latents, text embeddings and norm stats per segment, with the VAE and text encoder of
    `base_checkpoint` (the model training starts from) or of `checkpoint` (a path the step can read:
    vae/, text_encoder/, tokenizer/); neither: the preset's random weights. Returns the segment count."""
    from vaops.components.encode.config import EncodeConfig
    from vaops.components.encode.stage import run
    from vaops.components.step_outputs import save_metrics

    if base_checkpoint is not None and checkpoint:
        raise ValueError("give at most one of base_checkpoint (an artifact) and checkpoint (a path)")
    weights = base_checkpoint.path if base_checkpoint is not None else checkpoint or None
    result = run(EncodeConfig(dataset=dataset.path, output=encoded.path, report_dir=report.path, model_preset=preset,
                              robot=robot, checkpoint=weights, device=device, dtype=dtype, link_files=False))
    metrics.log_metric("segments", result.segments)
    metrics.log_metric("skipped_segments", len(result.skipped))
    metrics.log_metric("frames_per_second", result.frames_per_second)
    save_metrics(metrics)
    encoded.metadata.update({"preset": preset, "robot": robot, "segments": result.segments})
    return result.segments
