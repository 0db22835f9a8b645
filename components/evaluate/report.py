"""The human report of an evaluation: plots, Markdown and HTML beside metrics.json.

RoboTwin results are tabulated as the LingBot-VA paper does: one row per task, one column per
setting (Easy = clean, Hard = randomized) in percent, the 50-task average last, with the
paper's own average for reference.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from markdown_it import MarkdownIt  # noqa: E402

from vaops.components.reports import data_uri, html_page, inline_media, markdown_table  # noqa: E402
from vaops.models.atomic import write_text_atomically

from .results import EpisodeRecord  # noqa: E402
from .robotwin import PAPER_AVERAGE, SETTING_LABELS  # noqa: E402

MAX_EPISODE_ROWS = 200
MAX_EMBEDDED_VIDEOS = 24
# Videos up to this many bytes in all are inlined as data URIs: MLflow's artifact viewer shows the
# page from a blob URL, where a relative path resolves to nothing (a demo episode is ~50-200 KB).
MAX_INLINED_VIDEO_BYTES = 12 * 2**20
STATUS_COLORS = {"success": "tab:green", "failure": "tab:red", "error": "tab:gray"}


def _label(setting: str) -> str:
    return f"{SETTING_LABELS[setting]} ({setting})" if setting in SETTING_LABELS else setting


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def plot_success(metrics: dict, path: Path) -> str:
    tasks = list(metrics["tasks"])
    settings = list(metrics["settings"])
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.28 * len(tasks) * max(1, len(settings))))
    height = 0.8 / max(1, len(settings))
    y = np.arange(len(tasks))
    for i, setting in enumerate(settings):
        rates = [100 * metrics["tasks"][t].get(setting, {}).get("success_rate", np.nan) for t in tasks]
        ax.barh(y + i * height, rates, height=height, label=_label(setting))
    ax.set_yticks(y + height * (len(settings) - 1) / 2, tasks)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("success rate (%)")
    ax.set_title("Success by task")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_lengths(records: Sequence[EpisodeRecord], tasks: Sequence[str], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(tasks) + 2), 3.5))
    rng = np.random.default_rng(0)
    index = {t: i for i, t in enumerate(tasks)}
    for status, color in STATUS_COLORS.items():
        rs = [r for r in records if r.status == status]
        if rs:
            x = [index[r.task] + rng.uniform(-0.2, 0.2) for r in rs]
            ax.scatter(x, [r.steps for r in rs], s=14, color=color, label=status, alpha=0.8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=60 if len(tasks) > 4 else 0, ha="right" if len(tasks) > 4 else "center")
    ax.set_ylabel("episode length (actions)")
    ax.set_title("Episode length")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_latency(records: Sequence[EpisodeRecord], path: Path) -> str:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    series = {"chunk (act)": [x for r in records for x in r.chunk_latency_s],
              "observe (KV cache)": [x for r in records for x in r.observe_latency_s],
              "robot idle between chunks": [x for r in records for x in r.idle_s]}
    for label, values in series.items():
        if values:
            ax1.hist(values, bins=30, alpha=0.6, label=label)
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("count")
    if any(series.values()):
        ax1.legend(fontsize="small")
    ax1.set_title("Latency per request, idle per chunk")
    longest = max((len(r.chunk_latency_s) for r in records), default=0)
    if longest:
        by_index = [[r.chunk_latency_s[i] for r in records if len(r.chunk_latency_s) > i] for i in range(longest)]
        ax2.plot(range(longest), [np.mean(v) for v in by_index], marker="o", ms=3)
    ax2.set_xlabel("chunk index in the episode")
    ax2.set_ylabel("mean seconds")
    ax2.set_title("Chunk latency along the episode")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def paper_table(metrics: dict) -> str:
    """The LingBot-VA paper's form: a row per task, a column per setting (Easy, Hard) in %."""
    settings = list(metrics["settings"])
    rows = [[task] + [_pct(per[s]["success_rate"]) if s in per else "–" for s in settings]
            for task, per in metrics["tasks"].items()]
    rows.append([f"**Average ({len(metrics['tasks'])} tasks)**"]
                + [f"**{_pct(metrics['settings'][s]['success_rate'])}**" for s in settings])
    if metrics["suite"] == "robotwin":
        rows.append(["LingBot-VA, paper (50 tasks)"]
                    + [f"{PAPER_AVERAGE[s]:.2f}" if s in PAPER_AVERAGE else "–" for s in settings])
    return markdown_table(["Task"] + [f"{SETTING_LABELS.get(s, s)} (%)" for s in settings], rows)


def task_table(metrics: dict) -> str:
    rows = [[task, setting, t["episodes"], _pct(t["success_rate"]), _pct(t["mean_progress"]),
             f"{t['mean_steps']:.0f}", t["errors"]]
            for task, per in metrics["tasks"].items() for setting, t in per.items()]
    return markdown_table(["Task", "Setting", "Episodes", "Success (%)", "Mean progress (%)", "Mean length",
                           "Errors"], rows)


def episode_table(records: Sequence[EpisodeRecord]) -> str:
    shown = records if len(records) <= MAX_EPISODE_ROWS else [r for r in records if r.status == "error"][:MAX_EPISODE_ROWS]
    note = ""
    if len(shown) < len(records):
        note = (f"{len(records)} episodes: only episodes that ended in an error are listed; "
                f"every episode is in `episodes.jsonl`.\n\n")
    rows = [[r.setting, r.task, r.episode, r.seed, r.status, _pct(r.progress), r.steps, r.chunks,
             f"{np.mean(r.chunk_latency_s):.3f}" if r.chunk_latency_s else "–",
             f"[{Path(r.video).suffix[1:]}]({r.video})" if r.video else "–", r.error or ""] for r in shown]
    return note + markdown_table(["Setting", "Task", "Episode", "Seed", "Status", "Progress (%)", "Length", "Chunks",
                                  "Chunk latency (s)", "Video", "Reason"], rows)


def _loop_mode(loop: dict) -> str:
    grounded = " (grounded)" if loop.get("async_mode") == "grounded" else ""
    return (("asynchronous" + grounded if loop["async_execution"] else "synchronous") + " execution, "
            + ("real time" if loop["real_time"] else "as fast as the sim steps")
            + f", operating point {loop.get('operating_point', 'released')}")


def control_loop_table(metrics: dict) -> str:
    """Idle between chunks (last action done -> next chunk in hand) beside each chunk's execution."""
    rows = [[name, lat["count"], f"{lat['p50_s']:.3f}", f"{lat['p95_s']:.3f}", f"{lat['mean_s']:.3f}"]
            for name, lat in (("idle between chunks", metrics["latency"]["idle"]),
                              ("chunk execution", metrics["latency"]["execution"])) if lat["count"]]
    loop = metrics["control_loop"]
    return (markdown_table(["", "Chunks", "Median (s)", "p95 (s)", "Mean (s)"], rows)
            + f"\n{_loop_mode(loop).capitalize()}: the robot is idle {_pct(loop['idle_fraction'])}% of the "
              "control loop (idle / (idle + execution), from the first chunk in hand).")


def render_markdown(metrics: dict, records: Sequence[EpisodeRecord], plots: dict[str, str], title: str) -> str:
    lat = metrics["latency"]["chunk"]
    lines = [f"# {title}", ""]
    lines.append(f"- suite: **{metrics['suite']}**, episodes: **{metrics['episodes']}** of "
                 f"{metrics['expected_episodes']} planned, ended in error: **{metrics['errors']}**")
    for setting, s in metrics["settings"].items():
        lines.append(f"- {_label(setting)}: success **{_pct(s['success_rate'])}%** over {s['tasks']} task(s), "
                     f"mean progress {_pct(s['mean_progress'])}%")
    if lat["count"]:
        lines.append(f"- chunk latency: mean {lat['mean_s']:.3f} s, p95 {lat['p95_s']:.3f} s over {lat['count']} chunks")
    loop = metrics["control_loop"]
    idle = metrics["latency"]["idle"]
    if idle["count"]:
        lines.append(f"- control loop ({_loop_mode(loop)}): idle {idle['p50_s']:.3f} s per chunk (median, p95 "
                     f"{idle['p95_s']:.3f} s), {_pct(loop['idle_fraction'])}% of the time")
    lines += ["", "## Success rates", ""]
    if metrics["suite"] == "libero":
        from .libero_report import libero_tables

        lines.append(libero_tables(metrics, records))
    else:
        lines.append(paper_table(metrics) if metrics["suite"] == "robotwin" else task_table(metrics))
    lines += [f"![success by task](plots/{plots['success']})", "",
              f"![episode length](plots/{plots['lengths']})", "",
              f"![latency](plots/{plots['latency']})", ""]
    if idle["count"]:
        lines += ["## Control loop", "", control_loop_table(metrics), ""]
    if metrics["error_reasons"]:
        lines += ["## Errors", "", markdown_table(["Episodes", "Reason"], [[n, reason] for reason, n in
                                                                          metrics["error_reasons"].items()])]
    lines += ["## Episodes", "", episode_table(records)]
    return "\n".join(lines)


def poster(video: Path) -> str | None:
    """The video's first frame as a JPEG data URI (a <video> is black until it is played or seeked)."""
    try:
        import imageio.v2 as imageio
        from PIL import Image

        with imageio.get_reader(video, format="FFMPEG") as reader:
            frame = reader.get_data(0)
    except Exception:  # noqa: BLE001 (no decoder at hand: the video still plays, without a poster)
        return None
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=80)
    return f"data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def video_figures(records: Sequence[EpisodeRecord], folder: Path) -> tuple[str, dict[str, str]]:
    """Each episode's video with its caption: inlined while the budget lasts, linked beyond it
    (then it plays from the evaluation folder, not from MLflow's viewer), a poster on each.
    Returns the figures and, for the inlined videos, their path -> the figure's anchor."""
    out, budget = "", MAX_INLINED_VIDEO_BYTES
    anchors: dict[str, str] = {}
    videos = [(r, video) for r in records if (video := r.video)]
    for i, (r, video) in enumerate(videos[:MAX_EMBEDDED_VIDEOS]):
        path = folder / video
        caption = html.escape(f"{r.setting} / {r.task} / episode {r.episode} (seed {r.seed}): {r.status}")
        size = path.stat().st_size if path.is_file() else None
        if size is not None and size <= budget:
            src, budget, anchors[video] = data_uri(path), budget - size, f"video-{i}"
        else:
            src = html.escape(video)
            caption += f' (<a href="{src}">{src}</a> in the evaluation folder)'
        if video.endswith(".gif"):
            media = f'<img src="{src}" alt="episode video">'
        else:
            still = poster(path) if size is not None else None
            media = (f'<video src="{src}"' + (f' poster="{still}"' if still else "")
                     + ' controls muted loop preload="auto"></video>')
        out += f'<figure id="video-{i}">{media}<figcaption>{caption}</figcaption></figure>\n'
    return out, anchors


def render_html(markdown: str, records: Sequence[EpisodeRecord], title: str, folder: Path) -> str:
    """The Markdown as one HTML page that stands alone (Kubeflow's and MLflow's viewers, a copy
    elsewhere): plots and, up to MAX_INLINED_VIDEO_BYTES, videos are inlined as data URIs."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    body = inline_media(body, folder)
    videos, anchors = video_figures(records, folder)
    for video, anchor in anchors.items():  # the episode table's links go to the page's own player
        body = body.replace(f'href="{html.escape(video)}"', f'href="#{anchor}"')
    if videos:
        body += "<h2>Videos: real camera | imagined</h2>\n" + videos
    return html_page(title, body)


def write_report(folder: Path, metrics: dict, records: Sequence[EpisodeRecord], title: str) -> dict[str, Path]:
    folder = Path(folder)
    plots_dir = folder / "plots"
    tasks = list(metrics["identity"]["tasks"])
    plots = {
        "success": plot_success(metrics, plots_dir / "success_by_task.png"),
        "lengths": plot_lengths(records, tasks, plots_dir / "episode_length.png"),
        "latency": plot_latency(records, plots_dir / "latency.png"),
    }
    markdown = render_markdown(metrics, records, plots, title)
    write_text_atomically(folder / "report.md", markdown)
    write_text_atomically(folder / "report.html", render_html(markdown, records, title, folder))
    return {"markdown": folder / "report.md", "html": folder / "report.html",
            **{name: plots_dir / file for name, file in plots.items()}}
