"""ruff's pyflakes and syntax checks ([tool.ruff.lint] in pyproject.toml) hold on the whole project:
no undefined name, no unused import or variable, no redefinition."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).with_name("ruff")
CODE = ["models", "components", "pipelines", "serving", "bench", "tests"]


def ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUFF), "check", "--no-cache", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_the_project_passes_ruff():
    done = ruff(*CODE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_undefined_name_fails_it(tmp_path):
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / "bad.py").write_text("def f():\n    return undefined_name\n")
    done = ruff("bad.py", cwd=tmp_path)
    assert done.returncode == 1 and "F821" in done.stdout
