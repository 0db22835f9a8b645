"""One error convention for every command: bad input ends with one line naming the command and
the problem, exit code 2, no traceback (pipelines/cli.py)."""

from __future__ import annotations

from vaops.pipelines.cli import main


def test_a_commands_value_error_is_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["register", str(tmp_path)])  # an empty folder is no checkpoint
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == [f"vaops register: error: {tmp_path}: checkpoint lacks ['transformer', 'vae', 'text_encoder', "
                   f"'tokenizer', 'policy.json']"]
