"""params.yaml holds each data stage's preset and only what differs from it: a stage's config
dataclass and its presets stay the one place a default lives. Every stage command of dvc.yaml, its
section unpacked as DVC unpacks `${stage}`, decodes through the stage's own command line; no key
restates its preset's value; validate requires the fps the demos are recorded at.
tests/components/test_dvc.py runs the chain itself."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import shlex
from pathlib import Path

import yaml
from configobj import ConfigObj
from dvc.parsing.interpolate import to_str

from vaops.components.stage_cli import config_from_args
from vaops.pipelines.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]


def problems(params: dict) -> tuple[dict, list[str]]:
    """(each stage's config as dvc.yaml's command decodes it with `params`, what is wrong)."""
    parsing = ConfigObj(str(ROOT / ".dvc" / "config")).get("parsing", {})
    configs, found = {}, []
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        if f"${{{name}}}" not in stage["cmd"] or stage.get("params") != [name]:
            found.append(f"{name}: its command takes ${{{name}}} and its params are [{name}] alone")
            continue
        argv = shlex.split(stage["cmd"].replace(f"${{{name}}}", to_str(params[name], config=parsing)))
        module = importlib.import_module(COMMANDS[argv[1]][0])
        parser = argparse.ArgumentParser(prog=f"vaops {name}")
        module.add_arguments(parser)
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                args = parser.parse_args(argv[2:])
        except SystemExit:
            found.append(f"{name}: {stderr.getvalue().strip().splitlines()[-1]}")
            continue
        cfg = configs[name] = config_from_args(type(module.PRESETS["default"]), module.PRESETS, args)
        preset = module.PRESETS[args.preset]
        found += [f"{name}: {key} restates preset {args.preset!r}'s value" for key in params[name]
                  if key != "preset" and getattr(cfg, key.replace("-", "_")) == getattr(preset, key.replace("-", "_"))]
    if not found and configs["validate"].fps != configs["demos"].fps:
        found.append(f"validate requires fps {configs['validate'].fps}, "
                     f"the demos are recorded at {configs['demos'].fps}")
    return configs, found


def test_every_stage_decodes_its_preset_and_overrides():
    configs, found = problems(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert found == []
    assert configs["demos"].episodes == 20 and configs["clean"].gripper_channels == (6, 13)


def test_a_restated_misspelled_or_mismatched_value_is_reported():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, value, message in (("demos", {"episodes": 20, "fps": 10}, "demos: fps restates preset 'default'"),
                                    ("augment", {"sed": 1}, "augment: error: unrecognized arguments: --sed 1"),
                                    ("demos", {"fps": 25}, "validate requires fps 10, the demos are recorded at 25")):
        found = problems({**params, section: {**params[section], **value}})[1]
        assert any(message in line for line in found), found
