"""Reports open as printed: every page a run prints is an .html file whose images and videos load
where it is stored, as a file and inside MLflow's artifact viewer (a blob URL, where only data URIs
and absolute URLs resolve); the console shows a line per step, the steps' output goes to their logs.

The pipeline's folders are laid out here as kfp.local lays them out (the pipeline test runs the
real thing); media references are checked by parsing the HTML, not by a browser."""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from vaops.components.evaluate import report as eval_report
from vaops.components.evaluate.results import EpisodeRecord
from vaops.components.evaluate.video import write_mp4
from vaops.components.reports import write_report
from vaops.pipelines import cli
from vaops.pipelines.reports import write_index
from vaops.pipelines.run import _StepLogs


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "poster") and value:
                self.refs.append((tag, name, value))


def refs(page: Path) -> list[tuple[str, str, str]]:
    parser = _Refs()
    parser.feed(page.read_text())
    return parser.refs


def broken(page: Path, blob: bool = False) -> list[str]:
    """Media (and links) that do not resolve: from the file's folder, or (`blob`) from a blob URL,
    where only data URIs, in-page anchors and absolute URLs work. Links between pages count only
    for the file view."""
    bad = []
    for tag, attr, value in refs(page):
        if value.startswith(("data:", "#", "http://", "https://")):
            if value.startswith("data:") and len(value) < 40:
                bad.append(value)
            continue
        if blob and (tag != "a" or value.endswith((".mp4", ".gif", ".png"))):
            bad.append(value)
        elif not blob and not (page.parent / value).exists():
            bad.append(value)
    return bad


def _png(path: Path) -> None:
    Image.fromarray(np.full((8, 12, 3), 128, np.uint8)).save(path)


def _frames(n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (32, 48, 3), dtype=np.uint8) for _ in range(n)]


def _record(video: str | None, episode: int = 0) -> EpisodeRecord:
    return EpisodeRecord(suite="aloha", setting="sim", task="AlohaTransferCube-v0", episode=episode, seed=episode,
                         prompt="p", status="failure", success=False, progress=0.0, steps=16, chunks=1, video=video)


def test_stage_report_html_is_self_contained(tmp_path):
    folder = write_report(tmp_path / "report", {"ok": True}, "# Validation\n\n![strip](thumbnails/a.png)\n",
                          extra={"thumbnails/a.png": lambda p: (p.parent.mkdir(parents=True), _png(p))})
    page = folder / "report.html"
    assert "<title>Validation</title>" in page.read_text()
    assert [v[:15] for _, _, v in refs(page)] == ["data:image/png;"]
    assert broken(page) == [] and broken(page, blob=True) == []


def test_evaluation_videos_are_inlined_with_posters(tmp_path, monkeypatch):
    write_mp4(tmp_path / "episodes" / "e0.mp4", _frames(), fps=10)
    write_mp4(tmp_path / "episodes" / "e1.mp4", _frames(), fps=10)
    records = [_record("episodes/e0.mp4", 0), _record("episodes/e1.mp4", 1)]
    markdown = "# Eval\n\n" + eval_report.episode_table(records)
    page = tmp_path / "report.html"
    page.write_text(eval_report.render_html(markdown, records, "Eval", tmp_path))
    videos = [(a, v) for t, a, v in refs(page) if t == "video"]
    assert [a for a, _ in videos] == ["src", "poster"] * 2
    assert all(v.startswith("data:video/mp4;base64,") for a, v in videos if a == "src")
    poster = next(v for a, v in videos if a == "poster")
    assert poster.startswith("data:image/jpeg;base64,")
    import base64

    still = np.asarray(Image.open(io.BytesIO(base64.b64decode(poster.split(",", 1)[1]))))
    assert still.shape[:2] == (32, 48) and still.std() > 5  # the first frame, not black
    assert broken(page) == [] and broken(page, blob=True) == []  # table links go to the page's own players
    assert {v for t, _, v in refs(page) if t == "a"} == {"#video-0", "#video-1"}

    # beyond the inlining budget a video is linked from the evaluation folder, still with a poster
    monkeypatch.setattr(eval_report, "MAX_INLINED_VIDEO_BYTES", 0)
    page.write_text(eval_report.render_html(markdown, records, "Eval", tmp_path))
    videos = [(a, v) for t, a, v in refs(page) if t == "video"]
    assert ("src", "episodes/e0.mp4") in videos and sum(a == "poster" for a, _ in videos) == 2
    assert broken(page) == []


def _pipeline_layout(root: Path) -> dict:
    """The pipeline's outputs as kfp.local leaves them: Markdown copies beside report folders."""
    run = root / "vaops-2026-01-01-00-00-00-000000"
    outputs = {}
    for name, step in (("validation", "validate"), ("cleaning", "clean"), ("augmentation", "augment")):
        folder = write_report(run / step / "report", {}, f"# {step}\n\n![preview](preview.png)\n",
                              extra={"preview.png": _png})
        (run / step / "summary").write_text((folder / "report.md").read_text())
        outputs[name] = SimpleNamespace(path=str(run / step / "summary"))
    train = run / "train" / "checkpoint-run" / "report"
    train.mkdir(parents=True)
    (train / "report.md").write_text("# Training\n\n![curves](curves.png)\n")
    _png(train / "curves.png")
    (run / "train" / "report").write_text((train / "report.md").read_text())
    outputs["training"] = SimpleNamespace(path=str(run / "train" / "report"))
    results = run / "merge" / "results"
    write_mp4(results / "episodes" / "e0.mp4", _frames(), fps=10)
    records = [_record("episodes/e0.mp4")]
    (results / "report.html").write_text(eval_report.render_html("# Evaluation\n", records, "Evaluation", results))
    (run / "merge" / "report").write_text((results / "report.html").read_text())
    outputs["evaluation"] = SimpleNamespace(path=str(run / "merge" / "report"))
    (run / "register" / "decision").mkdir(parents=True)
    (run / "register" / "decision" / "gate_decision.json").write_text(json.dumps(
        {"verdict": "rejected", "reason": "success_rate 0.0 is below the threshold 0.5"}))
    outputs["gate"] = SimpleNamespace(path=str(run / "register" / "decision"))
    return {**outputs, "success_rate": 0.0, "promoted": False}


def test_index_links_pages_that_open_as_printed(tmp_path):
    pages = write_index(_pipeline_layout(tmp_path), tmp_path)
    assert list(pages)[:6] == ["index", "validation", "cleaning", "augmentation", "training", "evaluation"]
    assert pages["index"] == tmp_path / "index.html"
    assert pages["evaluation"].name == "report.html" and pages["evaluation"].parent.name == "results"
    for name, page in pages.items():
        assert page.is_file(), name
        if name != "gate":
            assert page.suffix == ".html", name
            assert broken(page) == [], name
        if name not in ("index", "gate"):
            assert broken(page, blob=True) == [], name  # as MLflow's viewer shows it
            assert any(v.startswith("data:image/png") or v.startswith("data:video/mp4") for _, _, v in refs(page))
    index = pages["index"].read_text()
    assert "below the threshold 0.5" in index and "did not promote" in index
    linked = {(pages["index"].parent / v).resolve() for t, _, v in refs(pages["index"]) if t == "a"}
    assert {p.resolve() for n, p in pages.items() if n != "index"} <= linked


KFP_LINES = """\
12:00:00.000 - INFO - Executing task \x1b[96m'train'\x1b[0m
12:00:00.000 - INFO - Streamed logs:

    [KFP Executor 2026-01-01 12:00:00,000 INFO]: Got executor_input:
    {
        "inputs": {
            "parameterValues": {"recipe": "tiny"}
        }
    }
    Svt[info]: SVT [version]: SVT-AV1 Encoder Lib
    train: 100%|##########| 2/2
12:00:03.000 - INFO - Task \x1b[96m'train'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m
12:00:03.000 - INFO - Task 'validate' cache hit
"""


def test_console_shows_a_line_per_step_and_the_log_keeps_everything(tmp_path):
    console = io.StringIO()
    tee = _StepLogs(console, tmp_path / "logs")
    for piece in re.split(r"(?<=    )", KFP_LINES):  # kfp prints the indent, then the line
        tee.write(piece)
    tee.close()
    shown = console.getvalue().splitlines()
    assert shown[0] == f"[7/12] train: running (log {tmp_path / 'logs' / 'train.log'})"
    assert re.fullmatch(r"\[7/12\] train: done in \d+ s", shown[1])
    assert shown[2:] == ["[3/12] validate: from the cache"]
    log = (tmp_path / "logs" / "train.log").read_text()
    assert '"recipe": "tiny"' in log and "SVT-AV1" in log and "train: 100%" in log
    assert tee.cached == ["validate"]

    verbose = io.StringIO()
    tee = _StepLogs(verbose, tmp_path / "logs2", verbose=True)
    tee.write(KFP_LINES)
    tee.close()
    assert verbose.getvalue() == KFP_LINES


def test_generate_takes_registry_uris(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert cli.main(["generate", "--checkpoint", "models:/nothing@champion", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "vaops generate: error: models:/nothing@champion: not in the model registry at sqlite:///")


def test_demo_hand_off_names_a_server_command_and_the_action_layout(tmp_path):
    from vaops.pipelines.demo import DEMO_PORT, DemoConfig, action_layout, serve_command

    cfg = DemoConfig(root=tmp_path)
    command = serve_command(cfg)
    assert command.startswith(f"MLFLOW_TRACKING_URI=sqlite:///{tmp_path.absolute() / 'mlflow.db'} ")
    assert command.endswith("serve --model models:/lingbot-va@champion --no-grpc") and DEMO_PORT == 8080
    assert action_layout().startswith("actions [14, 2, 16] = [robot channel, latent frame, action step]")
