"""The figures of docs/scaling.md, drawn from the raw results the fleet measurements write.

`python -m bench.plots [DIRECTORY]` (default docs/bench) reads what is there and writes a PNG beside it:

- `drain-*.json` (`scripts/bench-drain --json`) -> drain.png: reconnects over time when a worker
  drains or dies, one row per run.
- `rebalance.json` (`python -m fleet.bench_rebalance --json`) -> rebalance.png: connections per
  worker after a scale-out.
- `redis-cluster.json` (`python -m fleet.measure_redis_cluster --json`) -> redis-cluster.png:
  channels per master, and how they come back after a master restarts.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

DOCS_BENCH: Final = Path(__file__).resolve().parent.parent / "docs" / "bench"
DPI: Final = 110
# Reconnects are counted in bins this wide: narrow enough to show a peak, wide enough to not be noise.
BIN_S: Final = 0.25


def _save(fig: Figure, path: Path) -> Figure:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig


def drain(runs: list[dict[str, Any]], path: Path) -> Figure:
    """Per run (one `scripts/bench-drain --json` file): reconnects per bin, and the share of moved clients back."""
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.6 * len(runs)), dpi=DPI, squeeze=False)
    for (rate, back), run in zip(axes, runs, strict=True):
        clients = run["results"][0]["clients"]
        end_s = max(max(r["back_s"]) for r in run["results"])
        edges = [i * BIN_S for i in range(int(end_s / BIN_S) + 2)]
        for i, result in enumerate(run["results"]):
            colour = f"C{i}"
            times = result["back_s"]
            label = f"{result['scenario']}: peak {result['peak_per_s']}/s"
            counts, _ = np.histogram(times, bins=edges)
            rate.stairs(counts, edges, linewidth=1.6, color=colour, label=label)
            ordered = sorted(times)
            share = [100 * (n + 1) / len(ordered) for n in range(len(ordered))]
            back.step([0.0, *ordered], [0.0, *share], where="post", color=colour,
                      label=f"{result['scenario']}: all back after {result['all_back_s']:.1f} s")  # fmt: skip
        rate.set_title(f"{clients} clients on {run['workers']} workers: reconnects per {BIN_S:g} s")
        rate.set_ylabel("clients resubscribed")
        back.set_title(f"{clients} clients: share of the stopped worker's clients back")
        back.set_ylabel("% of moved clients")
        back.set_ylim(0, 105)
        for ax in (rate, back):
            ax.set_xlim(0, end_s * 1.05)
            ax.set_xlabel("seconds since the first close (kill -9: since the kill)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    return _save(fig, path)


def rebalance(raw: dict[str, Any], path: Path) -> Figure:
    """Connections per worker over time after a scale-out, with the shedding threshold, and sockets shed."""
    fig, (conns, shed) = plt.subplots(
        2, 1, figsize=(10, 6.5), dpi=DPI, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    samples = raw["samples"]
    times = [s["t_s"] for s in samples]
    pods = sorted({pod for s in samples for pod in s["connections"]})
    for pod in pods:
        # A worker that does not exist yet has no line there, rather than a misleading 0.
        points = [(s["t_s"], s["connections"][pod]) for s in samples if pod in s["connections"]]
        xs, ys = zip(*points, strict=True)
        new = " (added)" if pod == raw["new_worker"] else ""
        conns.step(xs, ys, where="post", linewidth=1.8, label=f"{pod}{new}")
    workers_after = raw["workers_before"] + 1
    average = raw["clients"] / workers_after
    threshold = (1 + float(raw["settings"]["rebalance_tolerance"])) * average
    conns.axhline(average, color="grey", linestyle=":", linewidth=1)
    conns.axhline(threshold, color="grey", linestyle="--", linewidth=1)
    conns.text(times[-1], average, f"average {average:.1f}", ha="right", va="bottom", fontsize=8, color="grey")
    conns.text(times[-1], threshold, f"sheds above {threshold:.1f}", ha="right", va="bottom", fontsize=8, color="grey")
    for ax in (conns, shed):
        ax.axvline(raw["scaled_out_s"], color="black", linewidth=0.8)
        ax.grid(True, alpha=0.3)
    conns.text(raw["scaled_out_s"], 0.98, " worker added", transform=conns.get_xaxis_transform(), fontsize=8,
               va="top")  # fmt: skip
    conns.set_ylabel("open WebSockets")
    conns.set_ylim(bottom=0)
    conns.legend(fontsize=8, loc="center right")
    s = raw["settings"]
    conns.set_title(
        f"{raw['workers_before']} -> {workers_after} workers, {raw['clients']} clients: "
        f"every {s['rebalance_interval_s']} s, at most {s['rebalance_max_shed_per_interval']} shed per worker"
    )
    # Counted from the first sample: a pod may already shed while the clients first connect.
    shed.step(times, [s["shed"] - samples[0]["shed"] for s in samples], where="post", color="C3")
    shed.set_ylabel("sockets shed (4013)")
    shed.set_xlabel("seconds since the scale-out began")
    return _save(fig, path)


def redis_cluster(raw: dict[str, Any], path: Path) -> Figure:
    """Channels and SSUBSCRIBE commands per master; channels back on a restarted master over time, per run."""
    fig, (spread, recovery) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=DPI, gridspec_kw={"width_ratios": [2, 3]})
    runs = raw["runs"]
    first = runs[0]
    masters = range(1, len(first["masters"]) + 1)
    width = 0.4
    spread.bar([m - width / 2 for m in masters], [m["channels"] for m in first["masters"]], width, label="channels")
    spread.bar([m + width / 2 for m in masters], [m["ssubscribe"] for m in first["masters"]], width,
               label="SSUBSCRIBE commands")  # fmt: skip
    for bars in spread.containers:
        spread.bar_label(bars, fontsize=8)
    spread.set_xticks(list(masters), [f"master {m}" for m in masters])
    spread.set_title(f"{first['channels']:,} channels of one pod over {len(first['masters'])} masters")
    spread.legend(fontsize=8, loc="lower right")
    spread.grid(True, axis="y", alpha=0.3)
    for i, run in enumerate(runs):
        colour = f"C{i}"
        xs = [1000 * t for t, _ in run["recovery"]]
        ys = [n for _, n in run["recovery"]]
        lost_ms = 1000 * run["not_ready_after_kill_s"]
        recovery.step(
            xs, ys, where="post", color=colour, label=f"run {i + 1}: not ready {lost_ms:.0f} ms after the kill"
        )
        ready_ms = 1000 * run["ready_after_restart_s"]
        recovery.axvline(ready_ms, color=colour, linestyle="--", linewidth=1)
        recovery.text(ready_ms, 0.02 + 0.07 * i, f" ready {ready_ms:.0f} ms", color=colour, fontsize=8,
                      transform=recovery.get_xaxis_transform())  # fmt: skip
    recovery.set_title("after kill -9 and a restart of one master: its channels back")
    recovery.set_xlabel("ms since the restart (dashed: the pod ready again)")
    recovery.set_ylabel("channels subscribed on that master")
    recovery.set_ylim(bottom=0)
    recovery.set_xlim(0, 1000 * max(max(t for t, _ in run["recovery"]) for run in runs) * 1.12)
    recovery.grid(True, alpha=0.3)
    recovery.legend(fontsize=8, loc="center right")
    return _save(fig, path)


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def render(directory: Path) -> list[Path]:
    """Every figure whose raw results are in `directory`, written there; the paths written."""
    written = []
    drains = sorted(directory.glob("drain-*.json"), key=lambda p: _load(p)["results"][0]["clients"])
    if drains:
        drain([_load(p) for p in drains], directory / "drain.png")
        written.append(directory / "drain.png")
    single: dict[str, Callable[[dict[str, Any], Path], Figure]] = {
        "rebalance": rebalance,
        "redis-cluster": redis_cluster,
    }
    for name, draw in single.items():
        if (directory / f"{name}.json").exists():
            draw(_load(directory / f"{name}.json"), directory / f"{name}.png")
            written.append(directory / f"{name}.png")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__)
    parser.add_argument("directory", type=Path, nargs="?", default=DOCS_BENCH)
    for path in render(parser.parse_args().directory):
        print(path)


if __name__ == "__main__":
    main()
