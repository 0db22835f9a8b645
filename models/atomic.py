"""Small-file I/O every stage shares: atomic writes (a file or folder appears whole under its
name, or not at all) and JSON reads whose errors name the file.

Light on imports on purpose: every stage uses it, and none should pay for diffusers to do so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """A hard link to `src` at `dst` (no bytes copied: checkpoints are tens of GB), or a copy
    where links are not possible (another file system); a `copy_function` for shutil.copytree."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_folder_atomically(folder: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Run `write(tmp_dir)` on a fresh sibling folder and swap it in for `folder` once it
    completed; a failed or interrupted write leaves any existing `folder` untouched."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}") if folder.exists() else None
    if old is not None:
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def write_file_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Run `write(tmp_path)` (a sibling with the same suffix) and rename it to `path` once done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_file_atomically(path, lambda tmp: tmp.write_text(text))


def read_json(path: str | os.PathLike, what: str):
    """The JSON in `path`; a missing or malformed file is an error naming it (`what` says what it is)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
