"""Command lines of the stages, generated from their typed configs, and the console output the
stages share (errors, progress bars).

Every field of a stage's config dataclass becomes a `--flag` (underscores as dashes) whose default
is the chosen preset's value (`--preset`, or the flag the command names, e.g. train's `--recipe`);
help texts come from `field(metadata={"help": ...})`. A flag's text is decoded by the config codec
(models/codec.py) into the field's type: a tuple from several values or one comma-separated
(`--tasks a b`, `--chunk-range 1,4`), `none` for an optional field, a boolean as `--flag`,
`--no-flag` or `--flag true|false`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from tqdm import tqdm

from vaops.models.codec import decode, encode

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
    if args and origin is not None and origin is not typing.Literal:  # Optional[X] / X | None
        return _base_type(args[0])
    return hint, False


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                         presets: dict[str, Any], preset_flag: str = "--preset", default: str = "default") -> None:
    parser.add_argument(preset_flag, choices=sorted(presets), default=default,
                        help="named configuration the other flags override (default: %(default)s)")
    for f in dataclasses.fields(cls):
        base, many = _base_type(typing.get_type_hints(cls)[f.name])
        value = getattr(presets[default], f.name)
        # An unset default (None, "") says nothing a help text does not already say ("unset: any").
        help_text = f.metadata.get("help", "") + (f" (default: {value!r})" if value not in (None, "") else "")
        if base is bool:
            parser.add_argument(flag(f.name), dest=f.name, nargs="?", const="true", metavar="true|false",
                                help=help_text)
            parser.add_argument(flag("no_" + f.name), dest=f.name, action="store_const", const="false",
                                help=argparse.SUPPRESS)
        else:
            choices = typing.get_args(base) if typing.get_origin(base) is typing.Literal else ()
            parser.add_argument(flag(f.name), dest=f.name, nargs="+" if many else None, help=help_text,
                                metavar="{" + ",".join(choices) + "}" if choices else f.name.upper())


def _raw(hint, text: str | list[str]) -> Any:
    """A flag's text as the codec's input for a field of type `hint`."""
    if isinstance(text, list) or typing.get_origin(hint) is tuple:
        items = text if isinstance(text, list) else [text]
        return [part for item in items for part in item.split(",") if part]
    if text.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    return text.lower() if _base_type(hint)[0] is bool else text


def config_from_args(cls: type[C], presets: dict[str, C], args: argparse.Namespace, preset_flag: str = "--preset",
                     base: C | None = None) -> C:
    """The named preset (or `base`) with the fields the command line gives, decoded and checked."""
    hints = typing.get_type_hints(cls)
    given = {f.name: _raw(hints[f.name], text) for f in dataclasses.fields(cls)
             if (text := getattr(args, f.name, None)) is not None}
    start = base if base is not None else presets[getattr(args, preset_flag[2:])]
    return decode(cls, {**encode(start), **given}, "command line")


def config_arguments(cfg: Any, base: Any) -> list[str]:
    """The flags that turn `base` into `cfg` (the fields that differ), as `config_from_args` reads them."""
    out = []
    for f in dataclasses.fields(cfg):
        value = encode(getattr(cfg, f.name))
        if value != encode(getattr(base, f.name)):
            text = ",".join(map(str, value)) if isinstance(value, list) else "none" if value is None else value
            out += [flag(f.name), str(text).lower() if isinstance(value, bool) else str(text)]
    return out


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
