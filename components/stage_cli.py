"""Command lines of the data stages, generated from their typed configs, and the console output
the stages share (errors, progress bars).

Every field of a stage's config dataclass becomes a `--flag` (underscores as dashes) whose
default is the chosen `--preset`'s value; help texts come from `field(metadata={"help": ...})`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from tqdm import tqdm

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

# Redraw interval of a progress bar whose stderr is a file or a pipe (kfp.local's step logs, a pod,
# `2> log`): tqdm's default 0.1 s writes a line per training step or episode there.
SPARSE_PROGRESS_S = 30.0


def _base_type(hint) -> tuple[type, bool]:
    """(element type, is a tuple) of a field annotation such as `int | None` or `tuple[int, ...]`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return args[0], True
    if args and origin is not None:  # Optional[X] / X | None
        return _base_type(args[0])
    return hint, False


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, presets: dict[str, Any]) -> None:
    parser.add_argument("--preset", choices=sorted(presets), default="default",
                        help="named configuration the other flags override (default: %(default)s)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, many = _base_type(hints[f.name])
        default = getattr(presets["default"], f.name)
        # An unset default (None, "") says nothing a help text does not already say ("unset: any").
        help_text = f.metadata.get("help", "") + (f" (default: {default!r})" if default not in (None, "") else "")
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=base, nargs="+" if many else None, default=None,
                                help=help_text)


def config_from_args(cls: type[C], presets: dict[str, C], args: argparse.Namespace) -> C:
    changes = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            changes[f.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(presets[args.preset], **changes)


def run_stage(name: str, body: Callable[[], int]) -> int:
    """Run a stage's command body; bad input ends with one clear line on stderr and exit code 2."""
    from vaops.components.dataset import DatasetError

    try:
        return body()
    except (DatasetError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"vaops {name}: error: {e}", file=sys.stderr)
        return 2


def progress(**kwargs) -> tqdm:
    """A tqdm bar that redraws at most every SPARSE_PROGRESS_S when stderr is not a terminal.
    maxinterval goes up with mininterval: tqdm's monitor thread otherwise redraws every 10 s."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", SPARSE_PROGRESS_S)
        kwargs.setdefault("maxinterval", SPARSE_PROGRESS_S)
    return tqdm(**kwargs)
