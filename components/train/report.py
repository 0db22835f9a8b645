"""The training stage's report: `metrics.json`, curves as a PNG, a short Markdown page and the same
page as self-contained HTML."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vaops.components.reports import REPORT_HTML, markdown_page  # noqa: E402
from vaops.models.atomic import write_folder_atomically  # noqa: E402
from vaops.models.config import Preset  # noqa: E402

from .config import TrainConfig  # noqa: E402
from .tracking import Tracker  # noqa: E402

CURVES = ("loss", "video_loss", "action_loss", "grad_norm", "lr", "tokens_per_s")


def _tail_mean(points: list[tuple[int, float]], n: int = 10) -> float | None:
    tail = [v for _, v in points[-n:]]
    return sum(tail) / len(tail) if tail else None


def write_report(output: Path, tracker: Tracker, cfg: TrainConfig, preset: Preset, n_params: int,
                 world: int) -> Path:
    """Write `<output>/report/{metrics.json, curves.png, report.md, report.html}` (atomically, as one
    folder); returns the Markdown path."""
    tracker.flush()
    curves = {k: tracker.history(k) for k in CURVES}
    loss = curves["loss"]
    metrics = {
        "steps": loss[-1][0] if loss else 0,
        "final_loss": loss[-1][1] if loss else None,
        "first_loss": loss[0][1] if loss else None,
        "final_loss_mean10": _tail_mean(loss),
        "final_video_loss_mean10": _tail_mean(curves["video_loss"]),
        "final_action_loss_mean10": _tail_mean(curves["action_loss"]),
        "tokens_per_s_mean10": _tail_mean(curves["tokens_per_s"]),
        "parameters": n_params,
        "world_size": world,
    }

    def fmt(v):
        return "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = [f"# Training run `{tracker.run_id}`", "",
             f"Preset `{preset.name}`, dataset `{cfg.dataset}`, {metrics['steps']} steps, "
             f"micro-batch {cfg.micro_batch} x accumulation {cfg.grad_accum} x {world} rank(s), "
             f"ZeRO stage {cfg.zero_stage}.", "",
             "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in metrics.items()]
    lines += ["", "![curves](curves.png)", ""]

    def write(folder: Path) -> None:
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        _plot(curves, folder / "curves.png",
              f"{preset.name}: {n_params / 1e6:.1f} M parameters, ZeRO-{cfg.zero_stage}, {world} rank(s)")
        (folder / "report.md").write_text("\n".join(lines))
        # The folder is the run's `report` artifact: MLflow's viewer renders report.md without its
        # relative image (the curves); this page has them inlined.
        (folder / REPORT_HTML).write_text(markdown_page("\n".join(lines), folder, f"Training run {tracker.run_id}"))

    return write_folder_atomically(output / "report", write) / "report.md"


def _plot(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for key, ax in zip(("loss", "video_loss", "action_loss"), axes.flat):
        if curves[key]:
            steps, values = zip(*curves[key])
            ax.plot(steps, values, lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    ax = axes.flat[3]
    if curves["lr"]:
        steps, values = zip(*curves["lr"])
        ax.plot(steps, values, color="tab:orange", lw=1)
    ax.set_title("learning rate")
    ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
