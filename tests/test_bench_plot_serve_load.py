"""bench/plot_serve_load.py --realtime: which rows it plots (those that record the idle at each chunk index) and
that it writes the figure; a file without such rows is one clear error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from plot_serve_load import plot_realtime, realtime_rows  # noqa: E402


def row(robots: int, p99: float, by_chunk: dict | None, staggered: bool = False) -> dict:
    out = {"operating_point": "paper", "robots": robots, "staggered": staggered, "idle_p99_s": p99}
    if by_chunk is not None:
        out["idle_max_by_chunk_s"] = by_chunk
    return out


def test_realtime_rows_are_those_with_idle_by_chunk_and_the_plot_is_written(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"realtime": [row(6, 0.013, {"1": 0.01, "2": 0.012}),
                                              row(8, 0.4, None)]}))  # before stop 42: no idle by chunk
    second.write_text(json.dumps({"realtime": [row(8, 0.39, {"1": 0.02, "10": 0.3}, staggered=True)]}))
    rows = realtime_rows([first, second])
    assert [(r["robots"], r["run"]) for r in rows] == [(6, 0), (8, 1)]
    out = tmp_path / "idle.png"
    plot_realtime(rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_file_without_realtime_rows_is_one_clear_error(tmp_path):
    path = tmp_path / "load_only.json"
    path.write_text(json.dumps({"load": [], "realtime": [row(8, 0.4, None)]}))
    with pytest.raises(SystemExit, match="no real-time rows with idle_max_by_chunk_s in .*load_only.json"):
        realtime_rows([path])
