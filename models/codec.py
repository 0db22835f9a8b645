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
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import draccus
from draccus.parsers.decoding import decode_tuple
from draccus.utils import DecodingError, ParsingError

T = TypeVar("T")


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
