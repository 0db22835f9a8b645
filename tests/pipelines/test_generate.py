import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest

from vaops.models.checkpoint import write_tiny_checkpoint
from vaops.pipelines import cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny", seed=2)


def test_generate_from_images(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    imageio.imwrite(images / "observation.images.top.png", rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    out = tmp_path / "out"
    assert cli.main(["generate", "--checkpoint", str(checkpoint), "--images", str(images), "--chunks", "3",
                     "--out", str(out)]) == 0
    frames = imageio.mimread(out / "video.mp4")
    fc = 2
    assert len(frames) == 1 + 4 * (3 * fc - 1)
    assert frames[0].shape == (64, 96, 3)
    actions = np.load(out / "actions.npz")
    assert actions["actions"].shape == (3, 14, fc, 16)
    assert np.isfinite(actions["actions"]).all()
    # Chunks after the first continue from imagined context, so they differ from the first.
    assert not np.allclose(actions["actions"][0], actions["actions"][1])
    assert sorted(p.name for p in out.iterdir()) == ["actions.npz", "meta.json", "video.mp4"]


def test_generate_names_missing_image(checkpoint, tmp_path, capsys):
    assert cli.main(["generate", "--checkpoint", str(checkpoint), "--images", str(tmp_path),
                     "--out", str(tmp_path / "o")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar
    assert last.startswith("vaops generate: error: ") and "observation.images.top.png: image for camera" in last
    assert not (tmp_path / "o" / "video.mp4").exists()


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "vaops.pipelines.cli", "--help"], capture_output=True, text=True)
    for name in cli.COMMANDS:
        assert name in out.stdout
    for name, (module, _) in cli.COMMANDS.items():
        mod = __import__(module, fromlist=["main"])
        assert callable(mod.add_arguments) and callable(mod.main), name
