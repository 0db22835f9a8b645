"""The layers hold: pipelines -> components | serving -> models, as [tool.importlinter] in
pyproject.toml declares them (components and serving never import each other).

import-linter runs as its own command: in-process its console outlives pytest's captured streams.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(config), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_no_module_imports_from_a_layer_above_it():
    done = lint(ROOT / "pyproject.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_a_crossed_layer_is_reported(tmp_path):
    """The same check with models declared above components: every components -> models import breaks it."""
    config = tmp_path / "reversed.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["vaops.components", "vaops.models"]\n\n'
                      '[[tool.importlinter.contracts]]\nname = "reversed"\ntype = "layers"\n'
                      'layers = ["vaops.models", "vaops.components"]\n')
    done = lint(config)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "vaops.components." in done.stdout and "-> vaops.models." in done.stdout
