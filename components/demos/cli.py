"""`vaops demos`: scripted-expert demonstrations from the MuJoCo ALOHA sim.

    vaops demos --output data/demos --episodes 50
    vaops demos --preset insertion --episodes 20
"""

from __future__ import annotations

from vaops.components.stage_cli import stage_command

from .config import PRESETS, DemosConfig


def _report(cfg: DemosConfig, r) -> int:
    print(f"wrote {r.episodes} episodes to {r.output} (scripted expert solved "
          f"{100 * r.success_rate:.0f}% of {r.attempts} seeds)")
    return 0


add_arguments, main = stage_command("demos", DemosConfig, PRESETS, _report)
