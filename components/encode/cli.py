"""`vaops encode`: VAE latents, text embeddings and action norm stats per segment, in the released layout.

    vaops encode --dataset data/augmented --output data/encoded                  # tiny random weights, CPU
    vaops encode --preset robotwin-gpu --checkpoint ~/lingbot-va-base \\
                 --dataset data/robotwin --output data/robotwin-latents          # Wan2.2 VAE + UMT5 on GPU
"""

from __future__ import annotations

from vaops.components.stage_cli import stage_command

from .config import PRESETS, EncodeConfig


def _report(cfg: EncodeConfig, r) -> int:
    print(f"wrote {r.files} latent files for {r.segments} segments to {r.output} ({len(r.skipped)} skipped, "
          f"{r.frames_per_second:.1f} frames/s; report: {cfg.report_dir}/report.md)")
    return 0


add_arguments, main = stage_command("encode", EncodeConfig, PRESETS, _report)
