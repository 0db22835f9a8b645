"""`vaops augment`: clip-consistent visual augmentation, instruction paraphrases, optional action noise.

    vaops augment --dataset data/clean --output data/augmented --copies 2 --seed 0
"""

from __future__ import annotations

from vaops.components.stage_cli import stage_command

from .config import PRESETS, AugmentConfig


def _report(cfg: AugmentConfig, r) -> int:
    print(f"wrote {r.originals} originals and {len(r.augmented)} augmented copies to {r.output} "
          f"(report: {cfg.report_dir}/report.md)")
    return 0


add_arguments, main = stage_command("augment", AugmentConfig, PRESETS, _report)
