"""One page per pipeline run that links every stage's report: `<root>/index.html`.

Each stage hands Kubeflow its report as an artifact (a Markdown copy, an HTML file), whose images
live in the stage's report folder beside it. Opened as a file, such a copy shows raw text and
broken images, so the index links pages that open as printed:
- the data and training stages: their `report.md` rendered into `<root>/reports/<stage>.html`,
  one self-contained page each (images inlined), made from the stage's report folder;
- the evaluation: its own `report.html` in the merged results folder (plots and videos inlined,
  so MLflow's copy plays them too);
- the gate's decision and the deployment manifest as they are.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from vaops.components.reports import REPORT_MD, html_page, markdown_page

INDEX = "index.html"
PAGES = "reports"
# Pipeline outputs that are Markdown reports -> the title of their page.
MARKDOWN_STAGES = {"validation": "Validation", "cleaning": "Cleaning", "augmentation": "Augmentation",
                   "training": "Training"}


def report_folder(artifact: Path) -> Path | None:
    """The folder holding the report whose Markdown the artifact copies (and the images it names):
    the step's `report` output (validate, clean, augment) or the training run's `report` folder."""
    step = artifact.parent
    for folder in (step / "report", *sorted(step.glob("*/report"))):
        if folder != artifact and (folder / REPORT_MD).is_file():
            return folder
    return None


def stage_page(artifact: Path, title: str, out: Path) -> Path:
    """`out`: the stage's Markdown report as one self-contained page."""
    folder = report_folder(artifact)
    markdown = (folder / REPORT_MD if folder else artifact).read_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(markdown_page(markdown, folder or artifact.parent, title))
    tmp.replace(out)
    return out


def evaluation_page(artifact: Path) -> Path:
    """The merged evaluation's own report.html (the `report` artifact is a copy of it)."""
    page = artifact.parent / "results" / "report.html"
    return page if page.is_file() else artifact


def write_index(outputs: dict[str, Any], root: Path, extra: dict[str, Path] | None = None) -> dict[str, Path]:
    """Render the stage pages and `<root>/index.html`; returns name -> page, the index first."""
    root = Path(root)
    pages: dict[str, Path] = {}
    for name, title in MARKDOWN_STAGES.items():
        if name in outputs:
            pages[name] = stage_page(Path(outputs[name].path), title, root / PAGES / f"{name}.html")
    if "evaluation" in outputs:
        pages["evaluation"] = evaluation_page(Path(outputs["evaluation"].path))
    if "gate" in outputs:
        pages["gate"] = Path(outputs["gate"].path) / "gate_decision.json"
    pages.update(extra or {})

    rows = []
    for name, page in pages.items():
        href = html.escape(Path(os.path.relpath(page, root)).as_posix())
        rows.append(f"<li><a href=\"{href}\">{html.escape(name)}</a> <code>{html.escape(str(page))}</code></li>")
    summary = []
    if "success_rate" in outputs:
        summary.append(f"evaluation success rate: <b>{outputs['success_rate']:.3f}</b>")
    if "promoted" in outputs:
        summary.append("the gate " + ("<b>promoted</b> the model" if outputs["promoted"] else "<b>did not promote</b> "
                                      "the model"))
        decision = pages.get("gate")
        if decision and decision.is_file():
            reason = json.loads(decision.read_text()).get("reason")
            if reason:
                summary[-1] += f": {html.escape(str(reason))}"
    body = ("<h1>vaops pipeline run</h1>\n" + "".join(f"<p>{line}</p>\n" for line in summary)
            + "<h2>Reports</h2>\n<ul>\n" + "\n".join(rows) + "\n</ul>\n"
            + f"<p>Outputs and step cache: <code>{html.escape(str(root))}</code>; each step's log: "
              f"<code>{html.escape(str(root / 'logs'))}</code></p>\n")
    index = root / INDEX
    tmp = index.with_name(f".{INDEX}.tmp")
    tmp.write_text(html_page("vaops pipeline run", body))
    tmp.replace(index)
    return {"index": index, **pages}
