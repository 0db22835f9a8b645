"""Stage reports: `report.json` for machines (Kubeflow, MLflow, tests), `report.md` for people and
`report.html`, the same page self-contained (its images inlined as data URIs), so it opens as a
file in a browser, in Kubeflow's viewer and in MLflow's, which serves HTML from a blob URL where
no relative path resolves. Written together into one folder that appears only when complete."""

from __future__ import annotations

import base64
import html
import json
import mimetypes
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from vaops.models.atomic import read_json, write_folder_atomically

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}"
         "img{max-width:100%}video{max-width:100%}figure{display:inline-block;margin:6px}")
_SRC = re.compile(r'(src|poster)="([^"]+)"')


def write_report(folder: str | Path, payload: dict, markdown: str,
                 extra: Mapping[str, Callable[[Path], object]] | None = None) -> Path:
    """`extra` maps further file names (plots, videos the Markdown links) to their writers."""
    def write(tmp: Path) -> None:
        (tmp / REPORT_JSON).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
        (tmp / REPORT_MD).write_text(markdown)
        for name, writer in (extra or {}).items():
            writer(tmp / name)
        (tmp / REPORT_HTML).write_text(markdown_page(markdown, tmp, _title(markdown)))

    return write_folder_atomically(folder, write)


def read_report(folder: str | Path) -> dict:
    return read_json(Path(folder) / REPORT_JSON, "report")


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def data_uri(path: str | Path) -> str:
    """The file as a `data:` URI (its type from the extension)."""
    kind = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def inline_media(body: str, folder: Path) -> str:
    """`src` and `poster` attributes naming files inside `folder` (relative paths) replaced by their
    data URIs; other references are left as they are."""
    folder = Path(folder)

    def swap(m: re.Match) -> str:
        ref = html.unescape(m.group(2))
        if re.match(r"^[a-z][a-z0-9+.-]*:", ref, re.I) or ref.startswith(("/", "#")):
            return m.group(0)
        path = (folder / ref).resolve()
        if not path.is_file() or not path.is_relative_to(folder.resolve()):
            return m.group(0)
        return f'{m.group(1)}="{data_uri(path)}"'

    return _SRC.sub(swap, body)


def html_page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}</body></html>\n")


def markdown_page(markdown: str, folder: str | Path, title: str = "report") -> str:
    """The Markdown as one self-contained HTML page; images relative to `folder` are inlined."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return html_page(title, inline_media(body, Path(folder)))


def write_html(folder: str | Path, title: str | None = None) -> Path:
    """`report.html` rendered from the folder's `report.md` (for reports written without it)."""
    from vaops.models.atomic import write_text_atomically

    folder = Path(folder)
    markdown = (folder / REPORT_MD).read_text()
    path = folder / REPORT_HTML
    write_text_atomically(path, markdown_page(markdown, folder, title or _title(markdown)))
    return path


def _title(markdown: str) -> str:
    first = next((line for line in markdown.splitlines() if line.startswith("# ")), "# report")
    return first[2:].strip()
