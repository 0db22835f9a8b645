"""Command lines of the stages, generated from their typed configs by the config codec's flag generator
(models/codec.py: every config field a flag), and the console output the stages share (errors, progress
bars).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from vaops.models.codec import add_config_arguments as add_config_arguments
from vaops.models.codec import config_arguments as config_arguments
from vaops.models.codec import config_from_args as config_from_args

# Redraw interval of a progress bar whose stderr is a file or a pipe (kfp.local's step logs, a pod,
# `2> log`): tqdm's default 0.1 s writes a line per training step or episode there.
SPARSE_PROGRESS_S = 30.0


def stage_command(name: str, cls: type, presets: dict[str, Any], report: Callable[[Any, Any], int]
                  ) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """`add_arguments` and `main` of the data stage `name`: every field of `cls` a flag over `presets`;
    `main` runs `vaops.components.<name>.stage.run` (imported only then) on the decoded config and
    returns `report(config, result)`, which prints the outcome. Bad input (a DatasetError is a
    ValueError) ends with one clear line on stderr and exit code 2."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser, cls, presets)

    def main(args: argparse.Namespace) -> int:
        try:
            run = importlib.import_module(f"vaops.components.{name}.stage").run
            cfg = config_from_args(cls, presets, args)
            return report(cfg, run(cfg))
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"vaops {name}: error: {e}", file=sys.stderr)
            return 2

    return add_arguments, main


def progress(**kwargs) -> tqdm:
    """A tqdm bar that redraws at most every SPARSE_PROGRESS_S when stderr is not a terminal.
    maxinterval goes up with mininterval: tqdm's monitor thread otherwise redraws every 10 s."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", SPARSE_PROGRESS_S)
        kwargs.setdefault("maxinterval", SPARSE_PROGRESS_S)
    return tqdm(**kwargs)
