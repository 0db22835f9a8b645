"""`vaops demo` decodes and checks every stage's config before it records or runs anything, as `vaops run`
does (pipelines/run.py's check_stages): a bad value is one line naming the stage, exit code 2."""

from __future__ import annotations

from vaops.pipelines.cli import main


def test_a_bad_stage_config_stops_the_demo_before_anything_runs(tmp_path, capsys):
    root = tmp_path / "demo"
    assert main(["demo", "--preset", "tiny", "--root", str(root), "--eval-episodes", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vaops demo: error: stage 'evaluate': episodes must be >= 1, got -1"]
    assert not root.exists()  # no data registry, no pipeline root
    assert main(["demo", "--preset", "tiny", "--base-checkpoint", str(tmp_path)]) == 2
    assert "needs a preset that post-trains a policy" in capsys.readouterr().err
