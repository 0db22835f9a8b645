"""mypy ([tool.mypy] in pyproject.toml) passes on vaops, bench and tests: no call with a keyword or an
argument the callee does not take, no Optional used as if it were set, no wrong return type.

The packages live in models/, components/, ... but import as vaops.models, vaops.components, ... (the
package-dir mapping in pyproject.toml), a mapping mypy cannot read from the editable install: it reads
them through a folder of links, vaops/<package> -> <package>/, and its messages are given back as
repository paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MYPY = Path(sys.executable).with_name("mypy")
PACKAGES = ["models", "components", "pipelines", "serving"]


def mypy(*paths: str, tmp_path: Path) -> tuple[int, str]:
    """mypy's exit code and messages on `paths` (repository paths), vaops.<package> resolving to this checkout."""
    links = tmp_path / "src" / "vaops"
    links.mkdir(parents=True)
    for package in PACKAGES:
        (links / package).symlink_to(ROOT / package)
    done = subprocess.run([str(MYPY), "--cache-dir", str(tmp_path / "cache"), *paths], cwd=ROOT,
                          env={**os.environ, "MYPYPATH": str(links.parent)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.returncode, done.stdout.replace(f"{links}/", "")


def test_the_project_passes_mypy(tmp_path):
    code, report = mypy(str(tmp_path / "src" / "vaops"), "bench", "tests", tmp_path=tmp_path)
    assert code == 0, report


def test_a_dropped_keyword_fails_it(tmp_path):
    """The call that broke --base-checkpoint: a keyword the callee no longer takes."""
    bad = tmp_path / "bad.py"
    bad.write_text("from vaops.models.atomic import write_text_atomically\n\n\n"
                   "def f() -> None:\n    write_text_atomically('a.txt', 'text', overwrite=True)\n")
    code, report = mypy(str(bad), tmp_path=tmp_path)
    assert code == 1 and 'Unexpected keyword argument "overwrite"' in report, report
