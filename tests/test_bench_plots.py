"""The scaling figures are drawn from the raw results committed in docs/bench/, and show what those results hold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import StepPatch

from bench import plots

RAW = ("drain-600.json", "drain-1500.json", "rebalance.json", "redis-cluster.json")
FIGURES = ("drain.png", "rebalance.png", "redis-cluster.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def raw(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((plots.DOCS_BENCH / name).read_text())
    return data


def last_point(line: Line2D) -> tuple[float, float]:
    return float(np.asarray(line.get_xdata())[-1]), float(np.asarray(line.get_ydata())[-1])


def labelled(ax: Axes) -> list[Line2D]:
    """The lines with a legend entry (matplotlib names the others "_child0" and so on)."""
    return [line for line in ax.lines if not str(line.get_label()).startswith("_")]


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    for name in RAW:
        shutil.copy(plots.DOCS_BENCH / name, tmp_path / name)
    return tmp_path


def test_every_figure_renders_from_the_committed_raw_results(copied: Path) -> None:
    written = plots.render(copied)
    assert sorted(p.name for p in written) == sorted(FIGURES)
    for path in written:
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        assert path.stat().st_size > 20_000  # axes, lines and labels, not an empty canvas


def test_a_directory_without_raw_results_renders_nothing(tmp_path: Path) -> None:
    assert plots.render(tmp_path) == []


def test_the_docs_show_every_figure() -> None:
    scaling = (plots.DOCS_BENCH.parent / "scaling.md").read_text()
    for name in FIGURES:
        assert (plots.DOCS_BENCH / name).read_bytes().startswith(PNG_SIGNATURE)
        assert f"](bench/{name})" in scaling


def test_the_drain_figure_counts_every_moved_client(tmp_path: Path) -> None:
    run = raw("drain-600.json")
    fig = plots.drain([run], tmp_path / "drain.png")
    rate, back = fig.axes
    for i, result in enumerate(run["results"]):
        bins = rate.patches[i]
        assert isinstance(bins, StepPatch)
        values, _, _ = bins.get_data()
        counted = int(sum(values))
        assert counted == result["moved"] == len(result["back_s"])
        line = back.lines[i]
        assert last_point(line) == (max(result["back_s"]), 100)
        assert result["scenario"] in str(line.get_label())


def test_the_rebalance_figure_follows_each_worker(tmp_path: Path) -> None:
    data = raw("rebalance.json")
    fig = plots.rebalance(data, tmp_path / "rebalance.png")
    last = data["samples"][-1]["connections"]
    lines = {str(line.get_label()).split()[0]: line for line in labelled(fig.axes[0])}
    assert set(lines) == set(last)
    for pod, line in lines.items():
        assert last_point(line)[1] == last[pod]
    assert sum(last.values()) == data["clients"]


def test_the_redis_cluster_figure_shows_each_master_and_each_recovery(tmp_path: Path) -> None:
    data = raw("redis-cluster.json")
    fig = plots.redis_cluster(data, tmp_path / "redis-cluster.png")
    spread, recovery = fig.axes
    channels = [patch.get_height() for patch in spread.containers[0]]
    assert channels == [m["channels"] for m in data["runs"][0]["masters"]]
    assert sum(channels) == data["runs"][0]["channels"]
    assert len(labelled(recovery)) == len(data["runs"])
    for line, run in zip(labelled(recovery), data["runs"], strict=True):
        assert last_point(line)[1] == run["masters"][0]["channels"]  # the restarted master got all its channels back
