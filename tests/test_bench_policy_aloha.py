"""bench/policy_aloha.py's pack-data / unpack-data: a work folder's training inputs travel between two device
calls as parts of at most 15 MiB (a call returns files of at most 16 MiB), without the encoded videos."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "policy_aloha.py"


def step(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_training_inputs_round_trip_in_parts_without_videos(tmp_path):
    work, parts, back = tmp_path / "work", tmp_path / "parts", tmp_path / "back"
    latents = work / "encoded" / "latents"
    latents.mkdir(parents=True)
    big = os.urandom(16 * 2**20 + 5)  # incompressible: two parts
    (latents / "episode_000000.pt").write_bytes(big)
    (work / "encoded" / "meta").mkdir()
    (work / "encoded" / "meta" / "info.json").write_text('{"fps": 50}\n')
    (work / "encoded" / "videos").mkdir()
    (work / "encoded" / "videos" / "cam.mp4").write_bytes(b"video")
    (work / "base.json").write_text('{"vae/x.safetensors": "abc"}\n')
    (work / "demos").mkdir()  # not a training input
    (work / "demos" / "d.txt").write_text("demo")

    done = step("pack-data", "--work", str(work), "--dest", str(parts))
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in parts.iterdir())
    assert files == ["data.tgz.part-000", "data.tgz.part-001"]
    assert (parts / files[0]).stat().st_size == 15 * 2**20

    done = step("unpack-data", "--work", str(back), "--source", str(parts))
    assert done.returncode == 0, done.stderr
    assert (back / "encoded" / "latents" / "episode_000000.pt").read_bytes() == big
    assert (back / "encoded" / "meta" / "info.json").read_text() == '{"fps": 50}\n'
    assert (back / "base.json").is_file()
    assert not (back / "encoded" / "videos").exists()
    assert not (back / "demos").exists()


def test_unpack_data_without_parts_names_the_folder(tmp_path):
    done = step("unpack-data", "--work", str(tmp_path / "w"), "--source", str(tmp_path))
    assert done.returncode != 0
    assert f"{tmp_path}: no data.tgz.part-* files" in done.stderr
