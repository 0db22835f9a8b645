"""Every report a run prints opens in a real browser with its images and videos loaded: from the
output folder (file://) and through MLflow's own artifact view (`mlflow ui`, the command the demo
prints), which fetches the page from `/get-artifact` and shows it from a blob URL in a sandboxed
iframe. test_reports.py checks the references by parsing the HTML; the browser also says whether
a data URI decodes and whether a video's codec plays.

The reports are made by the real writers (evaluation merge and MLflow logging, the training
tracker and report, the stage report writer, the run's index) from small synthetic inputs.
Chromium is Debian's (`make test` installs it: the Makefile's APT_PKGS), driven by playwright from
the dev extra; playwright's own browser download is never used (its build plays no H.264)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vaops.components.evaluate.config import EvalConfig, TrackingConfig
from vaops.components.evaluate.results import EPISODES_FILE, EpisodeLog, EpisodeRecord, write_manifest
from vaops.components.evaluate.run import merge_and_report
from vaops.components.evaluate.video import write_gif, write_mp4
from vaops.components.reports import write_report
from vaops.pipelines.reports import write_index

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TASK = "AlohaTransferCube-v0"
SERVER_START_S = 180  # `mlflow ui` took 13-50 s to answer on two busy cores

# Waits for every <img>, <video> and poster to load or fail, then reports each.
MEDIA_STATE = """async () => {
  const settle = (el, ok, events) => new Promise(done => {
    if (ok()) return done();
    events.forEach(e => el.addEventListener(e, done, {once: true}));
    setTimeout(done, 20000);
  });
  const images = [...document.images];
  const videos = [...document.querySelectorAll("video")];
  const posters = videos.filter(v => v.getAttribute("poster")).map(v => {
    const still = new Image();
    still.src = v.getAttribute("poster");
    return still;
  });
  await Promise.all([...images, ...posters].map(i => settle(i, () => i.complete, ["load", "error"])));
  await Promise.all(videos.map(v => settle(v, () => v.readyState >= 2 || v.error, ["loadeddata", "error"])));
  const name = el => (el.getAttribute("src") || "").slice(0, 48);
  return {
    images: images.map(i => ({src: name(i), width: i.naturalWidth})),
    posters: posters.map(i => ({src: name(i), width: i.naturalWidth})),
    videos: videos.map(v => ({src: name(v), ready: v.readyState, error: v.error && v.error.code,
                              width: v.videoWidth})),
  };
}"""


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 12, 3), 128, np.uint8)).save(path)


def _frames(n: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (32, 48, 3), dtype=np.uint8) for _ in range(n)]


def _evaluation(out: Path, uri: str) -> str:
    """An evaluation of two episodes, one with an H.264 mp4 and one with the GIF a node without
    ffmpeg writes, merged, reported and logged as `vaops eval` does; returns the MLflow run id."""
    config = EvalConfig(suite="aloha", output_dir=out, tasks=(TASK,), episodes=2)
    videos = config.shard_dir() / "videos" / "sim" / TASK
    log = EpisodeLog(config.shard_dir() / EPISODES_FILE)
    for episode, write, suffix in ((0, write_mp4, "mp4"), (1, write_gif, "gif")):
        video = write(videos / f"ep{episode:04d}_seed{episode}_failure.{suffix}", _frames(), 8)
        log.append(EpisodeRecord(suite="aloha", setting="sim", task=TASK, episode=episode, seed=episode, prompt="p",
                                 status="failure", success=False, progress=0.5, steps=16, chunks=2,
                                 chunk_latency_s=[0.2, 0.1], observe_latency_s=[0.05], idle_s=[0.2, 0.1],
                                 execution_s=[0.8, 0.8], video=video.relative_to(out).as_posix()))
    write_manifest(config, complete=True, episodes=2)
    run_id = merge_and_report(out, TrackingConfig(tracking_uri=uri)).mlflow_run_id
    assert run_id is not None, "the evaluation was not logged to MLflow"
    return run_id


def _training(output: Path) -> str:
    """A training run's report written and logged by the trainer's own tracker; returns its run id."""
    from vaops.components.train.config import TrainConfig
    from vaops.components.train.report import write_report as write_train_report
    from vaops.components.train.tracking import Tracker
    from vaops.models.config import get_preset

    tracker = Tracker("vaops-train", None, None, system_metrics=False, system_metrics_interval=10.0)
    for step in range(1, 6):
        tracker.log_metrics({"loss": 1 / step, "video_loss": 0.6 / step, "action_loss": 0.4 / step, "lr": 1e-4}, step)
    report = write_train_report(output, tracker, TrainConfig(dataset="latents", output=str(output)),
                                get_preset("tiny"), 1000, 1)
    tracker.log_artifacts(report.parent, "report")
    tracker.end()
    return tracker.run_id


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The pipeline's outputs as kfp.local lays them out, their printed pages, and the MLflow
    runs (with their experiments) that hold the evaluation and training reports."""
    root = tmp_path_factory.mktemp("reports")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run = root / "vaops-2026-01-01-00-00-00-000000"
    outputs = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        for name, step in (("validation", "validate"), ("cleaning", "clean"), ("augmentation", "augment")):
            folder = write_report(run / step / "report", {}, f"# {step}\n\n![preview](strips/preview.png)\n",
                                  extra={"strips/preview.png": _png})
            (run / step / "summary").write_text((folder / "report.md").read_text())
            outputs[name] = SimpleNamespace(path=str(run / step / "summary"))
        train_run = _training(run / "train" / "checkpoint-run")
        shutil.copyfile(run / "train" / "checkpoint-run" / "report" / "report.md", run / "train" / "report")
        outputs["training"] = SimpleNamespace(path=str(run / "train" / "report"))
        eval_run = _evaluation(run / "merge" / "results", uri)
    shutil.copyfile(run / "merge" / "results" / "report.html", run / "merge" / "report")
    outputs["evaluation"] = SimpleNamespace(path=str(run / "merge" / "report"))
    (run / "register" / "decision").mkdir(parents=True)
    (run / "register" / "decision" / "gate_decision.json").write_text(json.dumps(
        {"verdict": "rejected", "reason": "success_rate 0.0 is below the threshold 0.5"}))
    outputs["gate"] = SimpleNamespace(path=str(run / "register" / "decision"))
    pages = write_index({**outputs, "success_rate": 0.0, "promoted": False}, root)

    import mlflow

    client = mlflow.MlflowClient(uri)
    logged = {name: (client.get_run(run_id).info.experiment_id, run_id, path)
              for name, run_id, path in (("evaluation", eval_run, "report.html"),
                                         ("training", train_run, "report/report.html"))}
    return SimpleNamespace(root=root, uri=uri, pages=pages, logged=logged)


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium; first in each test's arguments, so a machine without it skips
    before any report is written."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (the Makefile's system-deps installs Debian's)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(reports):
    """`mlflow ui` on the store, as the demo tells its user to start it; yields its base URL."""
    port = _free_port()
    log = reports.root / "mlflow-ui.log"
    # Without its GenAI job runner (seven huey processes: 20 s more to start and to stop).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", reports.uri,
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  stdout=out, stderr=subprocess.STDOUT, cwd=reports.root, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow ui did not answer on {url}: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


class _Watch:
    """A page's failed loads, HTTP errors and console errors, each with the frame it came from:
    MLflow's own UI around the report has requests and errors of its own (a 404 for the current
    user on a server without authentication), which are none of the report's business."""

    def __init__(self, page):
        self.seen: list[tuple[str | None, str]] = []  # (frame url, problem)
        self.answered: list[str] = []  # URLs of the responses with status < 400
        page.on("response", lambda r: r.status < 400 and self.answered.append(r.url))
        page.on("requestfailed", lambda r: self.seen.append((r.frame.url, f"{r.url[:100]}: {r.failure}")))
        page.on("response", lambda r: r.status >= 400 and self.seen.append((r.frame.url,
                                                                            f"{r.url[:100]}: HTTP {r.status}")))
        page.on("console", lambda m: m.type == "error" and self.seen.append((m.location.get("url"),
                                                                             f"console: {m.text[:200]}")))
        page.on("pageerror", lambda e: self.seen.append((None, f"script error: {e}")))

    def problems(self, frame) -> list[str]:
        """The frame's own; script errors and console lines without a source count for the page's
        main frame only (in MLflow's UI they are the UI's)."""
        unsourced = (None, "") if frame == frame.page.main_frame else ()
        return [problem for url, problem in self.seen if url == frame.url or url in unsourced]


def _check_media(frame, watch: _Watch, where: str) -> dict:
    media = frame.evaluate(MEDIA_STATE)
    problems = watch.problems(frame)
    bad = [f"image {i['src']!r} did not load" for i in media["images"] + media["posters"] if i["width"] == 0]
    bad += [f"video {v['src']!r}: readyState {v['ready']}, error {v['error']}" for v in media["videos"]
            if v["ready"] < 2 or v["error"] or v["width"] == 0]
    assert not bad + problems, f"{where}: " + "; ".join(bad + problems)
    return media


def _counts(media: dict) -> tuple[int, int, int]:
    return len(media["images"]), len(media["videos"]), len(media["posters"])


# images, videos, posters on each printed page: the evaluation has three plots, the GIF episode
# as an <img> and the mp4 episode as a <video> with its poster.
EXPECTED = {"index": (0, 0, 0), "validation": (1, 0, 0), "cleaning": (1, 0, 0), "augmentation": (1, 0, 0),
            "training": (1, 0, 0), "evaluation": (4, 1, 1), "gate": (0, 0, 0)}


def test_printed_reports_load_their_media_from_the_output_folder(browser, reports):
    assert set(reports.pages) == set(EXPECTED)
    for name, path in reports.pages.items():
        page = browser.new_page()
        watch = _Watch(page)
        page.goto(path.as_uri(), wait_until="load")
        media = _check_media(page.main_frame, watch, f"{name} ({path})")
        assert _counts(media) == EXPECTED[name], (name, media)
        if name == "index":
            links = page.eval_on_selector_all("a", "links => links.map(a => a.href)")
            linked = {Path(urllib.request.url2pathname(urllib.parse.urlparse(href).path)) for href in links}
            assert {p for n, p in reports.pages.items() if n != "index"} <= linked
        page.close()


@pytest.mark.parametrize("name", ["evaluation", "training"])
def test_mlflow_shows_the_logged_report_with_its_media(browser, reports, mlflow_ui, name):
    experiment, run_id, path = reports.logged[name]
    page = browser.new_page()
    watch = _Watch(page)
    page.goto(f"{mlflow_ui}/#/experiments/{experiment}/runs/{run_id}/artifacts/{path}")
    # MLflow's HTML artifact view: the page fetched from /get-artifact, shown from a blob URL
    view = page.wait_for_selector("iframe.mlflow-html-iframe", timeout=60_000)
    frame = view.content_frame()
    frame.wait_for_load_state("load")
    assert frame.url.startswith(f"blob:{mlflow_ui}/")
    route = f"{mlflow_ui}/get-artifact?" + urllib.parse.urlencode({"path": path, "run_uuid": run_id})
    assert route in watch.answered, [u for u in watch.answered if "artifact" in u]
    media = _check_media(frame, watch, f"MLflow's view of {name} {path}")
    assert _counts(media) == EXPECTED[name], media
    assert all(m["src"].startswith("data:") for kind in media.values() for m in kind)
    page.close()
