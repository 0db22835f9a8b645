"""The config codec (models/codec.py): round trips of the project's dataclasses, and bad input as
one line naming the source, the field and the value."""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal

import pytest

from vaops.models.codec import ConfigError, decode, encode
from vaops.models.config import PRESETS, Camera, Preset, SamplingConfig, TransformerConfig


class Mode(enum.Enum):
    SYNC = "sync"
    ASYNC = "async"


@dataclasses.dataclass(frozen=True)
class Inner:
    key: str
    size: int = 1


@dataclasses.dataclass(frozen=True)
class Outer:
    pair: tuple[int, int] = (1, 2)
    values: tuple[float, ...] = ()
    maybe: int | None = None
    kind: Literal["a", "b"] = "a"
    mode: Mode = Mode.SYNC
    inners: tuple[Inner, ...] = ()
    named: dict[str, Inner] = dataclasses.field(default_factory=dict)
    flag: bool = False

    def __post_init__(self):
        if self.maybe is not None and self.maybe < 0:
            raise ValueError(f"outer: maybe must be >= 0, got {self.maybe}")


def test_round_trips():
    outer = Outer(pair=(3, 4), values=(0.5, -1e-7), maybe=2, kind="b", mode=Mode.ASYNC,
                  inners=(Inner("x", 3),), named={"n": Inner("y")}, flag=True)
    raw = encode(outer)
    assert raw["pair"] == [3, 4] and raw["inners"] == [{"key": "x", "size": 3}] and raw["mode"] == "ASYNC"
    assert decode(Outer, raw, "t") == outer
    for preset in PRESETS.values():  # every field of every preset, nested and tuples of pairs included
        assert decode(Preset, encode(preset), "preset") == preset
    assert decode(SamplingConfig, {"video_shift": 5}, "s").video_shift == 5.0


@pytest.mark.parametrize("raw, message", [
    ({"stepz": 1}, r"^f.json: unknown field\(s\) 'stepz'; allowed: pair, values, maybe, kind, mode, inners, named, "
                   r"flag$"),
    ({"inners": [{"key": "k", "colour": 1}]},
     r"^f.json: unknown field\(s\) 'colour' in 'inners.0'; allowed: key, size$"),
    ({"inners": [{"size": 1}]}, r"^f.json: field 'inners.0.key' is missing$"),
    ({"pair": [1, 2, 3]}, r"^f.json: field 'pair' got \[1, 2, 3\] \(Expected 2 items, got 3\)$"),
    ({"pair": [1, "two"]}, r"^f.json: field 'pair.1' got 'two' \(Couldn't parse 'two' into an int\)$"),
    ({"kind": "c"}, r"^f.json: field 'kind' got 'c' \(must be one of 'a', 'b'\)$"),
    ({"maybe": 1.5}, r"^f.json: field 'maybe' got 1.5 \(Couldn't parse '1.5' into an int\)$"),
    ({"pair": [1, 2.5]}, r"^f.json: field 'pair.1' got 2.5 \(Couldn't parse '2.5' into an int\)$"),
    ({"maybe": -1}, r"^f.json: outer: maybe must be >= 0, got -1$"),
    ({"flag": "yes"}, r"^f.json: field 'flag' got 'yes' "),
    ({"named": {"n": {"key": 3, "size": "big"}}}, r"^f.json: field 'named.n.size' got 'big' "),
    ([1, 2], r"^f.json: expected a mapping of Outer fields, got list$"),
])
def test_bad_input_is_one_line_naming_source_field_and_value(raw, message):
    with pytest.raises(ConfigError, match=message) as info:
        decode(Outer, raw, "f.json")
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_an_integral_float_is_an_int():
    """kfp passes a dict parameter's numbers as doubles: `vaops run`'s train config has steps 2.0."""
    assert decode(Outer, {"pair": [2.0, 3]}, "f.json").pair == (2, 3)
    assert decode(Outer, {"pair": ["4", 3]}, "f.json").pair == (4, 3)


def test_nested_checks_and_required_fields():
    with pytest.raises(ConfigError, match=r"^p: sampling: video_steps 0 and action_steps 50 must be at least 1$"):
        decode(SamplingConfig, {"video_steps": 0}, "p")
    with pytest.raises(ConfigError, match=r"^c: field 'height' is missing, field 'width' is missing$"):
        decode(Camera, {"key": "top"}, "c")
    assert decode(TransformerConfig, {"patch_size": [1, 2, 2], "pos_embed_seq_len": None}, "t") == TransformerConfig()


def test_a_string_is_no_tuple():
    with pytest.raises(ConfigError, match=r"^f: field 'values' got 'abc' \(expected a list, got str\)$"):
        decode(Outer, {"values": "abc"}, "f")


def test_policy_json_on_disk_loads_and_writes_back_the_same_values(tmp_path):
    """The shipped small ALOHA policy's policy.json (written before operating points and control_fps
    were recorded) loads, and writing its preset back keeps every value it has, the norm stats exactly."""
    import json
    import shutil
    from pathlib import Path

    from vaops.models.checkpoint import POLICY_FILE, policy_dict, read_preset

    shipped = Path(__file__).resolve().parents[2] / "checkpoints" / "small-aloha"
    raw = json.loads((shipped / POLICY_FILE).read_text())
    back = policy_dict(read_preset(shipped))
    assert {k: back[k] for k in raw if k != "sampling"} == {k: v for k, v in raw.items() if k != "sampling"}
    assert {k: back["sampling"][k] for k in raw["sampling"]} == raw["sampling"]
    folder = tmp_path / "ck"
    shutil.copytree(shipped, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / POLICY_FILE).write_text(json.dumps({**raw, "camera": []}))
    with pytest.raises(ConfigError, match=r"policy.json: unknown field\(s\) 'camera'; allowed: format, preset, "):
        read_preset(folder)
    (folder / POLICY_FILE).write_text(json.dumps({**raw, "layout": "stacked"}))
    with pytest.raises(ConfigError, match=r"policy.json: field 'layout' got 'stacked' \(must be one of 'tshape', "):
        read_preset(folder)


def test_episode_records_round_trip_and_a_bad_line_names_its_file_line_and_field(tmp_path):
    import json

    from vaops.components.evaluate.results import EpisodeLog, EpisodeRecord

    record = EpisodeRecord(suite="aloha", setting="sim", task="t", episode=1, seed=3, prompt="p", status="success",
                           success=True, progress=1.0, steps=40, chunks=3, chunk_latency_s=[0.25, 0.5])
    log = EpisodeLog(tmp_path / "episodes.jsonl")
    log.append(record)
    assert log.read() == [record]
    with open(log.path, "a") as f:
        f.write(json.dumps({**encode(record), "episode": 2, "steps": "many"}) + "\n")
    with pytest.raises(ConfigError, match=r"episodes.jsonl:2: field 'steps' got 'many' \(Couldn't parse 'many' into"):
        log.read()


@dataclasses.dataclass(frozen=True)
class Span:
    lo: int = 0
    hi: int = 1

    @classmethod
    def parse(cls, text: str) -> "Span":
        lo, hi = text.split("-")
        return cls(int(lo), int(hi))

    def __str__(self) -> str:
        return f"{self.lo}-{self.hi}"


@dataclasses.dataclass(frozen=True)
class Job:
    out: str = dataclasses.field(default="o", metadata={"flag": "output"})
    inner: Inner = Inner("k")
    secret: str | None = dataclasses.field(default=None, metadata={"flag": None})
    span: Span = Span()
    on: bool = dataclasses.field(default=True, metadata={"flag": "switch"})


def test_flags_of_nested_renamed_parsed_and_hidden_fields():
    import argparse

    from vaops.models.codec import add_config_arguments, config_arguments, config_from_args

    presets = {"default": Job(), "big": Job(inner=Inner("k", 9))}
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Job, presets)
    assert "--secret" not in parser._option_string_actions and "--out" not in parser._option_string_actions
    args = parser.parse_args(["--preset", "big", "--output", "x", "--key", "j", "--span", "2-5", "--no-switch"])
    job = config_from_args(Job, presets, args)
    assert job == Job(out="x", inner=Inner("j", 9), span=Span(2, 5), on=False)
    assert config_arguments(job, presets["big"]) == ["--output", "x", "--key", "j", "--span", "2-5", "--switch",
                                                     "false"]
    with pytest.raises(ConfigError, match=r"^command line: field 'inner.size' got 'x'"):
        config_from_args(Job, presets, parser.parse_args(["--size", "x"]))
    bare = argparse.ArgumentParser()  # a command without presets: no --preset, the base's values
    add_config_arguments(bare, Job, {"default": Job()}, preset_flag=None)
    assert "--preset" not in bare._option_string_actions
    assert config_from_args(Job, {}, bare.parse_args(["--size", "3"]), base=Job(secret="s")) == \
        Job(inner=Inner("k", 3), secret="s")
