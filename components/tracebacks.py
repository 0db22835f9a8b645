"""The error a failed process printed, read back from its output: the exception of its last Python
traceback as one line `Type: message` (the pipeline's failed steps, a training's ranks).

Read from the traceback's structure rather than by guessing at exception names: after
`Traceback (most recent call last):` come indented frames, then the exception's line and any
further lines of its message, which end at a blank line, a log line or the next traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RANK_PREFIX = re.compile(r"^\[(rank|default)\d+\]: ?")  # torchrun's per-rank line prefix (with --tee, or torch's own)
TRACEBACK = "Traceback (most recent call last):"
# "pkg.mod.SomeError: message", "SomeError" alone, or "pkg.mod.SomeError: " (an empty message).
_EXCEPTION = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?::\s?(?P<message>.*))?$")
# Lines that end a multi-line message: a log record, a launcher's report, a progress bar.
_NOT_MESSAGE = re.compile(r"^(\d{2}:\d{2}:\d{2}|\d{4}-\d{2}-\d{2}|\[|(INFO|WARNING|ERROR|DEBUG)\b|[\w-]+:\s*\d+%)")
MAX_MESSAGE = 2000  # characters of a message kept on the one line


def clean(line: str) -> str:
    """A line without colour codes, carriage-return overwrites, a rank prefix or trailing blanks."""
    return RANK_PREFIX.sub("", ANSI.sub("", line).rsplit("\r", 1)[-1]).rstrip()


def _exception_after(rest: list[str]) -> tuple[str, str] | None:
    """(type without its module, message on one line) of the traceback whose frames start `rest`."""
    # The frames are indented ("  File ...", the source line, the ^^^ markers).
    # Log records of other writers (a runner's timestamped lines) can land inside the traceback when
    # both streams are busy: they are not its exception line.
    first = next((i for i, line in enumerate(rest) if line and not line[0].isspace()
                  and not _NOT_MESSAGE.match(line.strip())), None)
    if first is None:
        return None
    m = _EXCEPTION.match(rest[first].strip())
    if m is None:  # not an exception line: report it as it is
        return "", rest[first].strip()
    message = [m["message"] or ""]
    for line in rest[first + 1:]:
        if not line.strip() or line.strip() == TRACEBACK or _NOT_MESSAGE.match(line.strip()):
            break
        message.append(line.strip())
    return m["type"].rsplit(".", 1)[-1], " ".join(part for part in message if part)


def last_exception(lines: Iterable[str], ignore: tuple[str, ...] = ()) -> str | None:
    """`Type: message` (the type without its module) of the last traceback in `lines` whose type
    is not in `ignore` (a launcher's own report of a failed child), its message on one line; None
    when there is no such traceback."""
    lines = [clean(line) for line in lines]
    starts = [i for i, line in enumerate(lines) if line.strip() == TRACEBACK]
    for start in reversed(starts):
        found = _exception_after(lines[start + 1:])
        if found is None or found[0] in ignore:
            continue
        kind, text = found
        text = text[:MAX_MESSAGE]
        return f"{kind}: {text}" if kind and text else kind or text
    return None


def last_words(lines: Iterable[str], skip: re.Pattern | None = None) -> str | None:
    """The last non-empty line (not matching `skip`): what a process that exits without a traceback
    (`SystemExit("...")`, a killed child, a C++ abort) said last."""
    for line in reversed([clean(line) for line in lines]):
        if line.strip() and not (skip and skip.search(line)):
            return line.strip()[:MAX_MESSAGE]
    return None


def describe_failure(lines: Iterable[str], skip: re.Pattern | None = None, ignore: tuple[str, ...] = ()) -> str | None:
    """The last traceback's exception (types in `ignore` passed over), else the last words; None
    for an empty log."""
    lines = list(lines)
    found = last_exception(lines, ignore)
    if found:
        return found
    words = last_words(lines, skip)
    # An exception line whose traceback header was lost (streams interleaved under load): the
    # same form as a traceback's, type without its module.
    m = _EXCEPTION.match(words) if words else None
    if m and m["type"].rsplit(".", 1)[-1] not in ignore:
        return f"{m['type'].rsplit('.', 1)[-1]}: {m['message']}" if m["message"] else m["type"].rsplit(".", 1)[-1]
    return words
