"""The one codec between the project's config dataclasses and JSON/YAML values (policy.json, the
transformer's config.json, train configs, episode records, pipeline parameters).

`encode(obj)` gives a JSON-ready dict (tuples as lists, nested dataclasses as dicts, enums by name);
`decode(cls, raw, source)` builds `cls` from such a mapping, nested dataclasses, tuples (fixed and
variadic), lists, dicts, `X | None`, `Literal` and enums included, and runs the classes'
`__post_init__` checks. Any bad input raises `ConfigError`: one line naming the source (a file, a
flag, a stage), the field's dotted path and the bad value; an unknown key names the allowed ones.

Built on draccus 0.10 (pinned for lerobot): its `decode`/`encode` do the walking. What it lacks is
added here: a decoder for `Literal` (0.10 has none: "No decoding function for type Literal[...]"),
tuples that refuse a string (draccus makes "ab" the tuple ('a', 'b')), and one-line messages (its
errors are multi-line, name the class instead of the source, and a `__post_init__` error comes back
as "Couldn't instantiate class" with the reason in `__cause__`).
Like draccus, scalars are converted where Python's constructor can (`"3"` -> 3 for an int, 5 -> 5.0
for a float), and an integral float is an int (2.0 -> 2: kfp passes numbers as doubles); booleans take
only true/false.

The command lines of the stages and `vaops serve` (`add_config_arguments`): every field of a config
dataclass becomes a `--flag` (underscores as dashes) whose default is the chosen preset's value (`--preset`,
or the flag the command names, e.g. train's `--recipe`; none for a command without presets); help texts come
from `field(metadata={"help": ...})`. A flag's text is decoded into the field's type: a tuple from several
values or one comma-separated (`--tasks a b`, `--chunk-range 1,4`), `none` for an optional field, a boolean
as `--flag`, `--no-flag` or `--flag true|false`. A nested config dataclass's fields are flags by their own
names (`EvalConfig.tracking.experiment`: `--experiment`), a field's `metadata={"flag": name}` renames its
flag (`None`: no flag, e.g. a secret), and a type with a `parse` classmethod is given as its text (`--shard
0/4`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import draccus
from draccus.parsers.decoding import decode_tuple
from draccus.utils import DecodingError, ParsingError

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
C = TypeVar("C", bound="DataclassInstance")


class ConfigError(ValueError):
    """A config value that cannot be decoded; the message is one line: source, field, value."""


def _decode_literal(cls: Any, raw: Any, path: Sequence[str]) -> Any:
    allowed = typing.get_args(cls)
    if raw not in allowed:
        raise DecodingError(path, f"must be one of {', '.join(map(repr, allowed))}")
    return raw


def _decode_tuple(cls: Any, raw: Any, path: Sequence[str]) -> tuple:
    if not isinstance(raw, (list, tuple)):  # draccus would make a string a tuple of its characters
        raise DecodingError(path, f"expected a list, got {type(raw).__name__}")
    return decode_tuple(*typing.get_args(cls))(raw, path)


def _decode_int(raw: Any, path: Sequence[str]) -> int:
    # A float with no fraction is an integer: kfp hands a dict parameter (vaops run's train config)
    # through a protobuf Struct, where every number is a double (steps: 2 arrives as 2.0).
    try:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError
        return int(raw)
    except (TypeError, ValueError):
        raise DecodingError(path, f"Couldn't parse '{raw}' into an int") from None


draccus.decode.register(int, _decode_int)
draccus.decode.register(Literal, _decode_literal, include_subclasses=True)
draccus.decode.register(tuple, _decode_tuple, include_subclasses=True)


def encode(obj: Any) -> Any:
    """A dataclass (or a value inside one) as JSON-ready values."""
    return draccus.encode(obj)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _field_type(cls: Any, path: Sequence[str]) -> Any:
    """The type at a draccus key path (field names, list indices, dict keys) below `cls`."""
    for key in path:
        args = [a for a in typing.get_args(cls) if a is not type(None) and a is not Ellipsis]
        if dataclasses.is_dataclass(cls):
            cls = typing.get_type_hints(cls)[key]
        elif typing.get_origin(cls) is tuple and len(args) > 1:
            cls = args[int(key)]
        elif args:
            cls = args[-1]  # X | None, tuple[X, ...], list[X], dict[K, X]
    args = [a for a in typing.get_args(cls) if a is not type(None)]
    return args[0] if len(args) == 1 and not dataclasses.is_dataclass(cls) else cls


def _value_at(raw: Any, path: Sequence[str]) -> Any:
    for key in path:
        try:
            raw = raw[int(key)] if isinstance(raw, (list, tuple)) else raw[key]
        except (LookupError, TypeError, ValueError):  # draccus's path of a dict key: "key=..."
            return raw
    return raw


def _message(cls: type, raw: Any, e: DecodingError) -> str:
    path = tuple(e.key_path)
    where = ".".join(path)
    text = _one_line(e.message)
    lines = e.message.strip().splitlines()
    if lines[0].startswith("Could not decode the value into any of the given types"):  # X | None: X's reason
        alternatives = [line.strip() for line in lines[1:]]
        text = alternatives[0].split(": ", 1)[-1] if len(alternatives) == 1 else "; ".join(alternatives)
    if text.startswith("The fields "):
        owner = _field_type(cls, path)
        unknown = [k for k in _value_at(raw, path) if k not in {f.name for f in dataclasses.fields(owner)}]
        return (f"unknown field(s) {', '.join(repr(k) for k in unknown)}" + (f" in {where!r}" if where else "")
                + f"; allowed: {', '.join(f.name for f in dataclasses.fields(owner))}")
    if text.startswith("Missing required field(s) "):
        missing = text[len("Missing required field(s) "):].split(" for ")[0].replace("`", "").split(", ")
        return ", ".join(f"field {'.'.join((*path, m))!r} is missing" for m in missing)
    text = text.split(' Underlying error is "')[-1].rstrip('"')  # draccus's wrapper of another exception
    return f"field {where!r} got {_value_at(raw, path)!r} ({text})"


def decode(cls: type[T], raw: Any, source: str) -> T:
    """`cls` from a mapping of its fields (as `encode` writes them); ConfigError names `source`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of {cls.__name__} fields, got {type(raw).__name__}")
    try:
        return draccus.decode(cls, dict(raw))
    except DecodingError as e:
        raise ConfigError(f"{source}: {_message(cls, raw, e)}") from None
    except ParsingError as e:  # the class's own check (__post_init__) refused the values
        raise ConfigError(f"{source}: {_one_line(e.__cause__ or e)}") from None


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


def _options(cls: type, path: tuple[str, ...] = ()) -> list[tuple[str, tuple[str, ...], Any, dataclasses.Field]]:
    """(flag name, the field's path, its type, the field) of every flag of `cls`."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and not hasattr(hint, "parse"):
            out += _options(hint, (*path, f.name))  # type: ignore[arg-type]
        elif (name := f.metadata.get("flag", f.name)) is not None:
            out.append((name, (*path, f.name), hint, f))
    return out


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        obj = getattr(obj, key)
    return obj


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                         presets: dict[str, Any], preset_flag: str | None = "--preset", default: str = "default") -> None:
    if preset_flag:
        parser.add_argument(preset_flag, choices=sorted(presets), default=default,
                            help="named configuration the other flags override (default: %(default)s)")
    for name, path, hint, f in _options(cls):
        base, many = _base_type(hint)
        value = _get(presets[default], path)
        # An unset default (None, "") says nothing a help text does not already say ("unset: any").
        shown = str(value) if hasattr(base, "parse") or isinstance(value, os.PathLike) else repr(value)
        help_text = f.metadata.get("help", "") + (f" (default: {shown})" if value not in (None, "") else "")
        if base is bool:
            parser.add_argument(flag(name), dest=name, nargs="?", const="true", metavar="true|false",
                                help=help_text)
            parser.add_argument(flag("no_" + name), dest=name, action="store_const", const="false",
                                help=argparse.SUPPRESS)
        else:
            choices = typing.get_args(base) if typing.get_origin(base) is typing.Literal else ()
            parser.add_argument(flag(name), dest=name, nargs="+" if many else None, help=help_text,
                                metavar="{" + ",".join(choices) + "}" if choices else name.upper())


def _raw(hint, text: str | list[str]) -> Any:
    """A flag's text as the codec's input for a field of type `hint`."""
    if isinstance(text, list) or typing.get_origin(hint) is tuple:
        items = text if isinstance(text, list) else [text]
        return [part for item in items for part in item.split(",") if part]
    if text.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    base = _base_type(hint)[0]
    if hasattr(base, "parse"):  # e.g. Shard from "0/4"
        return encode(base.parse(text))
    return text.lower() if base is bool else text


def config_from_args(cls: type[C], presets: dict[str, C], args: argparse.Namespace, preset_flag: str = "--preset",
                     base: C | None = None) -> C:
    """The named preset (or `base`) with the fields the command line gives, decoded and checked."""
    raw = encode(base if base is not None else presets[getattr(args, preset_flag[2:])])
    for name, path, hint, _ in _options(cls):
        if (text := getattr(args, name, None)) is not None:
            owner = raw
            for key in path[:-1]:
                owner = owner[key]
            owner[path[-1]] = _raw(hint, text)
    return decode(cls, raw, "command line")


def config_arguments(cfg: Any, base: Any) -> list[str]:
    """The flags that turn `base` into `cfg` (the fields that differ), as `config_from_args` reads them."""
    out = []
    for name, path, _, _ in _options(type(cfg)):
        value, was = _get(cfg, path), _get(base, path)
        if encode(value) != encode(was):
            value = str(value) if hasattr(value, "parse") else encode(value)
            text = ",".join(map(str, value)) if isinstance(value, list) else "none" if value is None else value
            out += [flag(name), str(text).lower() if isinstance(value, bool) else str(text)]
    return out
