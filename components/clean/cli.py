"""`vaops clean`: drop or repair episodes by documented rules (see `vaops.components.clean.stage`).

    vaops clean --dataset data/demos --output data/clean --validation-report data/reports/validate
    vaops clean --preset aloha --dataset data/demos --output data/clean   # also map grippers to 0..1
"""

from __future__ import annotations

from vaops.components.stage_cli import stage_command

from .config import PRESETS, CleanConfig


def _report(cfg: CleanConfig, r) -> int:
    print(f"wrote {r.kept} episodes to {r.output}: {len(r.dropped)} dropped, {len(r.changed)} changed "
          f"(report: {cfg.report_dir}/report.md)")
    for ep, reasons in sorted(r.dropped.items()):
        print(f"  dropped episode {ep}: " + "; ".join(reasons))
    return 0


add_arguments, main = stage_command("clean", CleanConfig, PRESETS, _report)
