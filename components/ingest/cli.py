"""`vaops ingest`: any LeRobot dataset -> a normalised (v3.0) dataset directory.

    vaops ingest --source ~/robotwin-clean-and-aug-lerobot --output data/robotwin   # v2.1, converted
    vaops ingest --source data/demos --output data/ingested                        # v3.0, copied
    vaops ingest --repo . --rev v1 --source data/demos --output data/demos-v1      # DVC at a revision

Exits 1 when a written parquet or video is broken (each named on its own line), 2 on bad input.
"""

from __future__ import annotations

from vaops.components.stage_cli import stage_command

from .config import PRESETS, IngestConfig


def _report(cfg: IngestConfig, r) -> int:
    print(f"wrote {r.output}: {r.episodes} episodes, {r.frames} frames (source was LeRobot {r.source_version})")
    for note in r.notes:
        print(f"  converted: {note}")
    if r.broken:
        print(f"{len(r.broken)} broken files (`vaops validate` quarantines their episodes):")
        for line in r.broken:
            print(f"  {line}")
        return 1
    return 0


add_arguments, main = stage_command("ingest", IngestConfig, PRESETS, _report)
