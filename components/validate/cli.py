"""`vaops validate`: check a dataset and write report.json + report.md; exit 1 when unusable.

    vaops validate --dataset data/demos --report-dir data/reports/validate
    vaops validate --preset aloha --dataset data/demos     # also require fps, widths and camera
    vaops validate --preset robotwin --dataset data/robotwin   # or libero; joint limits from robot_type
"""

from __future__ import annotations

from vaops.components.stage_cli import stage_command

from .config import PRESETS, ValidateConfig


def _report(cfg: ValidateConfig, report) -> int:
    print(f"{cfg.dataset}: {'usable' if report.usable else 'UNUSABLE'}; {len(report.passed)} of "
          f"{report.episodes} episodes passed, {len(report.quarantine)} quarantined; robot limits: "
          f"{report.robot or 'none'} (report: {cfg.report_dir}/report.md)")
    for p in report.dataset_problems:
        print(f"  dataset: {p.message}" + (f" [{p.file}]" if p.file else ""))
    for ep, problems in sorted(report.quarantine.items()):
        print(f"  episode {ep}: " + "; ".join(p.line() for p in problems))
    return 0 if report.usable else 1


add_arguments, main = stage_command("validate", ValidateConfig, PRESETS, _report)
