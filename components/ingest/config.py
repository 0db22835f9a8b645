"""Typed configuration of `vaops ingest` and its named presets."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class IngestConfig:
    source: str = field(default="", metadata={
        "help": "LeRobot dataset directory (v2.1 or v3.0), or its path inside --repo"})
    output: str = field(default="data/ingested", metadata={"help": "normalised dataset directory to write"})
    repo: str | None = field(default=None, metadata={"help": "local git+DVC repository holding --source"})
    rev: str | None = field(default=None, metadata={"help": "git revision of --repo; unset: the workspace"})


PRESETS: dict[str, IngestConfig] = {"default": IngestConfig()}
