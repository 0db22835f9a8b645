"""The layers hold: pipelines -> components | serving -> models, as [tool.importlinter] in
pyproject.toml declares them (components and serving never import each other)."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_no_module_imports_from_a_layer_above_it(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out
