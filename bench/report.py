"""Turn raw results into docs/benchmarks.md (tables, ratios, machine) and docs/bench/*.png (plots)."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Final

REFERENCE: Final = "eva-ws"
PLOT_NAME: Final = "p99_vs_throughput.png"
# Hand-written reading of the results, kept across runs: included in the report after the summary.
ANALYSIS_NAME: Final = "analysis.md"
METHOD: Final = """## Method

- Every system gets its own fresh `redis-server` on a free loopback port. Publishers go through Redis the
  way each system documents for external publishers: eva-ws through its own library (`service.publisher`
  on the Redis broker: one Lua script assigns the offset, appends history and PUBLISHes; see
  `publish_path` in the raw results), python-socketio through `AsyncRedisManager(write_only=True).emit`,
  Node Socket.IO through the `@socket.io/redis-emitter` wire format, the raw reference through a bare
  `PUBLISH`. Many-channels and ingest are the exception for eva-ws and the raw reference: their
  publishers write the same messages pre-encoded (see Ingest below), because at thousands of events a
  second eva-ws's script costs Redis, on the load generator's core, enough to put that core's queue
  into eva-ws's latency (a step at 4,194 events/s had p50 65 ms with the pod 69% busy and the load
  generator's sockets holding megabytes unread; pre-encoded, 3 ms). The script's cost is measured on
  its own in Publish.
- Every event carries the same 250-byte JSON object with a per-channel sequence number and its publish
  time (`time.time_ns()`; every process runs on this machine). Latency = receive time - publish time.
  Lost = events published on a client's channel that it never received; dup = a sequence number not
  above the last one that client saw.
- Compression is off everywhere: the client never offers permessage-deflate, Socket.IO runs with
  `perMessageDeflate: false`.
- Server CPU is `utime + stime` of the server process from `/proc/<pid>/stat` (all threads), not wall
  time. *Deliveries per core-second* = deliveries / server CPU seconds: what one busy core sustains.
- Fan-out and many-channels: the publish rate grows by a constant factor per step until p99 is over
  the limit on two steps in a row (or events are lost); the summary reports the best step within it.
- The load generator (picows on uvloop) runs on the other core with the publisher and Redis; its CPU
  use is in the step tables: near 100% it, not the server, is the limit.
- In fan-out every event arrives as a burst of one frame per subscriber, and one client process reads
  that burst one frame after the other: a few ms of p50 come from the reading side. The raw aiohttp
  reference shows that floor; compare the others against it rather than against zero.
- Every scenario starts a fresh Redis, server and publisher, so none inherits another's memory or
  clean-up work. Every server keeps its framework's default listen backlog (aiohttp 128, Node 511).
- The machine may be shared. The harness runs at raised priority (`--nice`), waits (bounded) for
  outside load to calm down before each scenario, records the cores used by other processes during
  every step ("other processes' CPU") and measures a step again once if that exceeded 0.3 cores
  (the disturbed first attempt stays in `results.json`).
- Idle memory is the growth of the server's RSS from before the clients connected to after they
  settled, divided by the number of connections. The default 19,500 connections stay under the hard
  limit of 20,000 open files per process on the benchmark machine (`ulimit -Hn`).
- Slow consumers: readers and stalled clients share one channel; after a calm phase the stalled
  clients stop reading (receive buffer cut to 4 KiB) for a phase long enough to push more than the
  kernel absorbs on loopback (the sender's buffer grows up to `tcp_wmem` max, 4 MiB here). Reported:
  the readers' p99 in both phases and the server's RSS growth. Whether a server closed the stalled
  clients is not yet seen from the client side (a paused socket does not report the close even once
  it reads again); the servers' own logs tell it: eva-ws logs `slow_consumer_closed` and closes with 4008.
- Ingest: the per-event cost when events are spread thin. Events go round-robin over 10,000 channels;
  5,000 clients each subscribe to a channel of their own, the other 5,000 channels have no subscriber
  on the pod (so Redis never sends their events to it: a pod subscribes only to channels it has
  listeners for). Publishing is split over several publisher processes (`ingest.publishers`), each
  pacing its own share of the channels. For eva-ws and the raw reference the publishers use no
  publish API: each writes pre-encoded messages as pipelined plain `PUBLISH` commands (hand-packed
  RESP on one connection per process, replies counted, not parsed), so Redis spends a few µs per
  event instead of the 25-50 µs of eva-ws's publish script (offset, history, idempotency), and Redis,
  the publishers and the load generator on the client core can offer a pod more than it takes
  (through the script they topped out at 13,000-17,000 events/s, where per-wakeup costs, not
  per-event ones, dominate the pod's CPU). For eva-ws each message is the exact envelope the script
  would publish: `e1:<offset>:<epoch>\n` and the event as `service.publisher` encodes it (type, data,
  timestamp, a correlation id of its own), with consecutive offsets per channel starting after the
  position the pod read through the history script when the channel's subscriber joined. So the pod
  sees every event as the next one of its channel and does exactly what it does for an event the
  script published: decode, route, write; no gap repair, no history read. The raw results record the
  pod's counters over the ladder (`pod_counters`: events replayed from history, resyncs, invalid
  messages, Redis reconnects, and the log's channel resyncs; per step as `server_counters`), 0 when
  that held. Nothing is appended to history (the pod reads none) and the meta hash keeps the position
  the pod read, so a pod that falls so far behind that Redis cuts it off (its output-buffer limit
  for PUB/SUB clients) cannot repair from history as it would after the script: that step's events
  count as lost and the ladder ends there, as it would anyway. The script's own cost is the publish
  scenario's. The raw reference gets the bare payload, as from its own publisher; python-socketio and
  Node Socket.IO keep their own publish paths (the library's emit, the emitter's format). The rate
  grows by `ingest.rate_factor` per step; unlike the other ladders this one does not stop at the
  p99 limit (CPU per event is the point, and it is lowest where the pod is busiest) but once events
  are lost (a pod that falls far enough behind is cut off by Redis's output-buffer limit for PUB/SUB
  clients) or the publishers fall a whole step behind: then they, or Redis behind them on the shared
  core, are the limit, not the server. *Events per core-second* = events the pod took from Redis,
  decoded, routed and wrote to their one subscriber / server CPU seconds, from the busiest step;
  latency, lost and dup are those of the subscribed half.
- Publish (eva-ws only: the peers have no publish API that assigns offsets, keeps history and honours
  idempotency keys). Transaction updates, each with its own idempotency key, in batches of each size of
  `publish.batches` (100 and 1,000, the API's largest), `publish.concurrency` calls in flight, for
  `publish.duration_s`, once through `POST /api/v1/publish` and once through the Python `Publisher`
  (`publish_prepared`), alternating, `publish.runs` times each (medians reported, every run listed).
  Every event does the whole publish: validation, encoding, state change, idempotency check, offset,
  history append, PUBLISH. *Events per core-second* = events accepted (answered 202, or given a
  position) / CPU seconds of whoever did the publishing work: the pod for the HTTP API, the calling
  process for the library. Redis CPU per event is reported beside it, since the script's work is
  Redis's, not the caller's. Every accepted event is checked against the offsets in
  Redis: `offsets_total` equals `events` in the raw results, or exceeds it when a call timed out
  (a 503, or BrokerUnavailable, may come after Redis stored the events; the runs list such errors).
"""
# The goals for the two scenarios that measure the per-event path.
INGEST_TARGET_PER_CORE_S: Final = 100_000
PUBLISH_TARGET_PER_CORE_S: Final = 50_000


def _version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    try:
        # Fixed argv of well-known tools, no shell.
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        if m:
            mem = f"{int(m.group(1)) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": _version(["node", "--version"]),
        "redis": _version(["redis-server", "--version"]),
    }


def git_commit() -> str:
    """The repository commit being measured (with "+changes" when the work tree differs)."""
    head = _version(["git", "-C", str(Path(__file__).resolve().parent.parent), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(Path(__file__).resolve().parent.parent), "status", "--porcelain", "service"])
    return head + ("+changes" if dirty not in ("unknown", "not installed") else "")


def sizes_json(sizes: Any) -> dict[str, Any]:
    return dataclasses.asdict(sizes)


def _f(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _best_step(result: dict[str, Any]) -> dict[str, Any] | None:
    steps = result.get("steps") or []
    limit = result.get("p99_limit_ms", 50.0)
    within = [s for s in steps if s["p99_ms"] <= limit and not s["lost_total"]]
    return max(within, key=lambda s: s["deliveries_per_s"]) if within else None


def _per_cpu_s(step: dict[str, Any] | None) -> float | None:
    if not step or not step["cpu_us_per_delivery"]:
        return None
    return 1e6 / float(step["cpu_us_per_delivery"])


def summary_rows(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Headline numbers per target (None where a scenario did not run or failed)."""
    rows: dict[str, dict[str, float | None]] = {}
    for name, target in results["targets"].items():
        sc = target.get("scenarios", {})
        row: dict[str, float | None] = {}
        for key in ("fanout", "channels"):
            r = sc.get(key, {})
            best = _best_step(r) if "steps" in r else None
            # CPU cost does not depend on the latency limit: take it from the busiest step measured,
            # where per-event overheads are best amortised and the 10 ms tick of /proc matters least.
            busiest = max(r["steps"], key=lambda s: s["delivered"]) if r.get("steps") else None
            row[f"{key}_rate"] = best["deliveries_per_s"] if best else None
            row[f"{key}_p50"] = best["p50_ms"] if best else None
            row[f"{key}_p99"] = best["p99_ms"] if best else None
            row[f"{key}_p999"] = best["p999_ms"] if best else None
            row[f"{key}_cpu_us"] = busiest["cpu_us_per_delivery"] if busiest else None
            row[f"{key}_best_cpu_us"] = best["cpu_us_per_delivery"] if best else None
            row[f"{key}_per_core"] = _per_cpu_s(busiest)
            row[f"{key}_lost"] = r.get("lost") if "steps" in r else None
            row[f"{key}_dups"] = r.get("dups") if "steps" in r else None
        st = sc.get("storm", {})
        row["storm_rate"] = st.get("handshakes_per_s")
        row["storm_cpu_us"] = st.get("cpu_us_per_handshake")
        idle = sc.get("idle", {})
        row["idle_kib"] = idle.get("kib_per_connection")
        row["idle_clients"] = idle.get("clients")
        slow = sc.get("slow", {})
        row["slow_p99_calm"] = slow.get("p99_calm_ms")
        row["slow_p99_slow"] = slow.get("p99_with_slow_ms")
        row["slow_closed"] = slow.get("slow_closed_by_server")
        row["slow_rss"] = slow.get("rss_growth_mb")
        rows[name] = row
    return rows


def _interference(results: dict[str, Any]) -> str:
    """How busy the machine was with other work while steps were measured."""
    seen = [
        float(step.get("other_cpu_util", 0.0))
        for target in results["targets"].values()
        for result in target.get("scenarios", {}).values()
        for step in result.get("steps") or []
    ]
    if not seen:
        return "load from other processes: not measured"
    mean = sum(seen) / len(seen)
    return (
        f"load from processes outside the benchmark during measured steps: mean {mean:.2f} cores, "
        f"max {max(seen):.2f} cores (per step in the tables below; above ~0.2 the numbers are disturbed)"
    )


def _ratio(ours: float | None, theirs: float | None, *, higher_is_better: bool) -> str:
    if not ours or not theirs:
        return "-"
    r = ours / theirs if higher_is_better else theirs / ours
    return f"{r:.2f}x"


def plot(results: dict[str, Any], path: Path) -> bool:
    """p99 latency against delivered events per second: one panel per scenario, one colour per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return False
    panels = {"fanout": "fan-out: one channel", "channels": "many channels", "ingest": "ingest: 10,000 channels"}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), dpi=110, sharey=True)
    colours = [f"C{i}" for i in range(10)]  # matplotlib's default cycle
    drawn = 0
    for ax, (key, title) in zip(axes, panels.items(), strict=True):
        limit = 50.0
        for i, (name, target) in enumerate(results["targets"].items()):
            result = target.get("scenarios", {}).get(key, {})
            limit = result.get("p99_limit_ms", limit)
            pts = [(s["deliveries_per_s"], max(s["p99_ms"], 0.01)) for s in result.get("steps") or [] if s["delivered"]]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            ax.plot(
                xs, ys, "-o", color=colours[i % len(colours)], label=name, linewidth=2.5 if name == REFERENCE else 1.3
            )
            drawn += 1
        ax.axhline(limit, color="grey", linestyle=":", linewidth=1)
        ax.text(0.99, limit * 1.08, f"p99 limit {limit:g} ms", color="grey", fontsize=8, ha="right",
                transform=ax.get_yaxis_transform())  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Matplotlib labels minor ticks of a log axis that spans less than a decade; they overlap.
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("delivered events per second (all clients)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("p99 delivery latency (ms)")
    fig.suptitle("p99 latency vs delivered events/s, server pinned to one core")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return drawn > 0


def _steps_table(name: str, key: str, result: dict[str, Any]) -> list[str]:
    if "channels" in result:
        spread = f" on {result['channels']} channels, one subscriber each on the first {result.get('subscribers')}"
    elif "customers" in result:
        spread = f" over {result['customers']} customers"
    else:
        spread = " on one channel"
    lines = [
        f"**{name} — {key}** ({result.get('subscribers')} clients{spread})",
        "",
        "| events/s asked | events/s published | delivered/s | p50 ms | p99 ms | p99.9 ms | server CPU (of a core) "
        "| CPU µs/delivery | load-gen CPU (of a core) | other processes' CPU | lost | dup |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result["steps"]:
        lines.append(
            f"| {_f(s['rate'], 0)} | {_f(s.get('published_per_s'), 0)} | {_f(s['deliveries_per_s'], 0)} "
            f"| {_f(s['p50_ms'], 2)} | {_f(s['p99_ms'], 2)} "
            f"| {_f(s['p999_ms'], 2)} | {s['server_cpu_util']:.0%} | {_f(s['cpu_us_per_delivery'], 2)} "
            f"| {s['loadgen_cpu_util']:.0%} | {s.get('other_cpu_util', 0.0):.0%} "
            f"| {s['lost_total']} | {s['dups_total']} |"
        )
    return [*lines, ""]


def _ingest_section(results: dict[str, Any]) -> list[str]:
    """Events per core-second over many thinly subscribed channels, per system."""
    rows = []
    for name, target in results["targets"].items():
        r = target.get("scenarios", {}).get("ingest")
        if not r:
            continue
        if "steps" not in r:
            rows.append(f"| {name} | {r.get('skipped') or 'failed: ' + str(r.get('error', '?'))[:120]} |" + " |" * 8)
            continue
        busiest = max(r["steps"], key=lambda s: s["delivered"]) if r["steps"] else None
        best = _best_step(r)
        # The busiest step's own counts when recorded, else the whole ladder's.
        counters = (busiest or {}).get("server_counters") or r.get("pod_counters")
        rows.append(
            f"| {name} | {_f(_per_cpu_s(busiest), 0)} | {_f(busiest['cpu_us_per_delivery'] if busiest else None, 2)} "
            f"| {busiest['server_cpu_util'] if busiest else 0.0:.0%} "
            f"| {_f(busiest['published_per_s'] if busiest else None, 0)} "
            f"| {_f(best['deliveries_per_s'] if best else None, 0)} "
            f"| {_f(best['p50_ms'] if best else None, 2)} / {_f(best['p99_ms'] if best else None, 2)} "
            f"| {r.get('lost', '-')} / {r.get('dups', '-')} "
            f"| {r.get('publisher_wire', '-')} | {_counters_text(counters) if counters else '-'} |"
        )
    if not rows:
        return []
    return [
        f"### Ingest: events over many channels, 0 or 1 subscriber each (target: at least "
        f"{INGEST_TARGET_PER_CORE_S:,} events per core-second)",
        "",
        "| system | events per core-second* | server CPU µs/event* | server CPU (of a core)* | events/s published* "
        "| delivered/s (p99 ≤ limit) | p50 / p99 ms (p99 ≤ limit) | lost / dup | published as "
        "| pod*: replayed / resyncs / invalid / reconnects / channel resyncs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        *rows,
        "",
        "\\* from the step with the most deliveries. Only events on subscribed channels reach a pod, so these",
        "are the subscribed half's events: taken from Redis, decoded, routed and written to one socket each.",
        "*published as*: `envelope`, the publish script's envelopes pre-encoded in pipelined `PUBLISH`; `bare`,",
        "the bare payload the same way; otherwise the target's own publisher (see Method). *pod*: eva-ws's events",
        "replayed from history, unrecovered resumes, invalid messages, Redis reconnects (metrics) and channel",
        "resyncs (log) during that step; all 0 when it took every envelope as the next event of its channel.",
        "",
    ]


def _counters_text(counters: dict[str, float]) -> str:
    """The eva-ws pod's counts, in bench.scenarios' POD_COUNTER_METRICS and POD_COUNTER_LOG_EVENTS order."""
    return " / ".join(f"{v:.0f}" for v in counters.values())


def _publish_section(results: dict[str, Any]) -> list[str]:
    """Events accepted into Redis per core-second through the HTTP API and the library (eva-ws only)."""
    rows, skipped = [], []
    for name, target in results["targets"].items():
        r = target.get("scenarios", {}).get("publish")
        if not r:
            continue
        if "runs" not in r:
            skipped.append(f"- {name}: {r.get('skipped') or 'failed: ' + str(r.get('error', '?'))[:200]}")
            continue
        labels = {"http": "`POST /api/v1/publish`", "library": "`Publisher` (Python library)"}
        for m in r["ways"]:
            via = m["via"]
            runs = ", ".join(
                _f(x["events_per_core_s"], 0) for x in r["runs"] if x["via"] == via and x["batch"] == m["batch"]
            )
            cpu_of = "pod" if via == "http" else "publishing process"
            rows.append(
                f"| {name} | {labels[via]} | {m['batch']} | {_f(m['events_per_s'], 0)} "
                f"| {_f(m['events_per_core_s'], 0)} ({runs}) | {_f(m['publishing_cpu_us_per_event'], 1)} ({cpu_of}) "
                f"| {_f(m['redis_cpu_us_per_event'], 1)} | {_f(m['publisher_cpu_us_per_event'], 1)} |"
            )
    if not rows and not skipped:
        return []
    out = [
        f"### Publish: keyed events accepted into Redis (target: at least {PUBLISH_TARGET_PER_CORE_S:,} "
        "events per core-second)",
        "",
    ]
    if rows:
        out += [
            "| system | way | events per call | events/s | events per core-second (each run) "
            "| publishing CPU µs/event | Redis CPU µs/event | publisher process CPU µs/event |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "Medians over the runs. Redis CPU is the script's work (idempotency check, offset, history, state,",
            "PUBLISH); it runs on the client core and is what bounds events/s on this machine.",
            "",
        ]
    if skipped:
        out += ["Not measured:", "", *skipped, ""]
    return out


def markdown(results: dict[str, Any], plot_rel: str | None, analysis: str | None = None) -> str:
    """The report; `analysis` (hand-written reading of the numbers) goes right after the summary."""
    m = results["machine"]
    rows = summary_rows(results)
    names = list(results["targets"])
    out = [
        "# Benchmarks",
        "",
        "eva-ws measured side by side with the servers a team would pick instead, in the same run,",
        "by the same load generator (`bench/`), on one machine over loopback.",
        "",
        "## How to reproduce",
        "",
        "```sh",
        results["command"],
        "```",
        "",
        "`scripts/bench --size tiny` runs every scenario in seconds; `scripts/bench --help` lists the knobs",
        "(`--set fanout.subscribers=500`, `--targets`, `--scenarios`, pinning).",
        "Raw numbers: `docs/bench/results.json`.",
        "",
        "## Machine",
        "",
        f"- `nproc`: {m['nproc']}; CPU: {m['cpu']}; memory: {m['memory']}",
        f"- kernel: {m['kernel']}; Python {m['python']}; Node.js {m['node']}; {m['redis']}",
        f"- server pinned with `taskset -c {results['server_cpus'] or '(none)'}`; load generator "
        f"({results['loadgen_processes']} {results['client']} process(es)), publisher and Redis on "
        f"`taskset -c {results['client_cpus'] or '(none)'}`",
        f"- commit measured: `{results.get('commit', 'unknown')}`",
        f"- run started {results['started']}, took {results['wall_s'] / 60:.1f} min; size preset `{results['size']}`; "
        f"niceness {results.get('nice', 0)}",
        f"- {_interference(results)}",
        "",
        METHOD,
        "## Summary",
        "",
        "| system | fan-out delivered/s (p99 ≤ limit) | fan-out p50 / p99 / p99.9 ms "
        "| fan-out CPU µs/delivery (p99 ≤ limit) | fan-out CPU µs/delivery* "
        "| fan-out deliveries per core-second* | many-channels delivered/s (p99 ≤ limit) "
        "| many-channels CPU µs/delivery* "
        "| handshakes/s | CPU µs/handshake | idle KiB/connection | slow consumers: readers' p99 calm → stalled ms "
        "| lost / dup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        r = rows[name]
        skipped = results["targets"][name].get("skipped")
        if skipped:
            out.append(f"| {name} | skipped: {skipped} |" + " |" * 11)
            continue
        lost = sum(int(r[k] or 0) for k in ("fanout_lost", "channels_lost"))
        dups = sum(int(r[k] or 0) for k in ("fanout_dups", "channels_dups"))
        out.append(
            f"| {name} | {_f(r['fanout_rate'], 0)} | {_f(r['fanout_p50'], 2)} / {_f(r['fanout_p99'], 2)} / "
            f"{_f(r['fanout_p999'], 2)} | {_f(r['fanout_best_cpu_us'], 2)} | {_f(r['fanout_cpu_us'], 2)} "
            f"| {_f(r['fanout_per_core'], 0)} "
            f"| {_f(r['channels_rate'], 0)} | {_f(r['channels_cpu_us'], 2)} | {_f(r['storm_rate'], 0)} "
            f"| {_f(r['storm_cpu_us'], 0)} | {_f(r['idle_kib'], 1)} | {_f(r['slow_p99_calm'], 2)} → "
            f"{_f(r['slow_p99_slow'], 2)} | {lost} / {dups} |"
        )
    out += [
        "",
        '\\* from the step with the most deliveries, whatever its latency. "-": no step stayed within the',
        "p99 limit, or the scenario failed (see below). Steps taken while other processes used the machine",
        "are marked in the detail tables; read their latencies with that in mind.",
        "",
    ]
    if REFERENCE in rows and len(names) > 1:
        ref = rows[REFERENCE]
        out += [
            f"### Ratios: {REFERENCE} against each peer (above 1x means {REFERENCE} does better)",
            "",
            "| peer | fan-out delivered/s | fan-out CPU per delivery | many-channels CPU per delivery | handshakes/s "
            "| memory per idle connection |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name in names:
            if name == REFERENCE or results["targets"][name].get("skipped"):
                continue
            p = rows[name]
            out.append(
                f"| {name} | {_ratio(ref['fanout_rate'], p['fanout_rate'], higher_is_better=True)} "
                f"| {_ratio(ref['fanout_cpu_us'], p['fanout_cpu_us'], higher_is_better=False)} "
                f"| {_ratio(ref['channels_cpu_us'], p['channels_cpu_us'], higher_is_better=False)} "
                f"| {_ratio(ref['storm_rate'], p['storm_rate'], higher_is_better=True)} "
                f"| {_ratio(ref['idle_kib'], p['idle_kib'], higher_is_better=False)} |"
            )
        out.append("")
    out += _ingest_section(results) + _publish_section(results)
    if analysis:
        out += [analysis.strip(), ""]
    if plot_rel:
        out += [
            "## p99 latency against throughput",
            "",
            f"![p99 latency vs delivered events per second]({plot_rel})",
            "",
        ]
    out += ["## Details", ""]
    for name in names:
        sc = results["targets"][name].get("scenarios", {})
        for key in ("fanout", "channels", "ingest"):
            if "steps" in sc.get(key, {}):
                out += _steps_table(name, key, sc[key])
    detail_rows = []
    for name in names:
        sc = results["targets"][name].get("scenarios", {})
        st, idle, slow = sc.get("storm", {}), sc.get("idle", {}), sc.get("slow", {})
        detail_rows.append(
            f"| {name} | {st.get('ok', '-')} of {st.get('clients', '-')} in {_f(st.get('elapsed_s'), 2)} s "
            f"(p99 {_f(st.get('handshake_p99_ms'), 1)} ms) | {idle.get('clients', '-')} conns: "
            f"{_f(idle.get('rss_before_mb'), 0)} → {_f(idle.get('rss_after_mb'), 0)} MiB, idle CPU "
            f"{_f((idle.get('idle_cpu_util') or 0) * 100, 1)}% | {slow.get('slow', '-')} of "
            f"{(slow.get('readers') or 0) + (slow.get('slow') or 0)} stalled: server RSS "
            f"+{_f(slow.get('rss_growth_mb'), 1)} MiB during the stalled phase |"
        )
    out += [
        "| system | connect storm | idle connections | slow consumers |",
        "|---|---|---|---|",
        *detail_rows,
        "",
    ]
    errors = [
        f"- {name} / {key}: {r['error']}"
        for name, t in results["targets"].items()
        for key, r in t.get("scenarios", {}).items()
        if "error" in r
    ]
    if errors:
        out += ["## Failed scenarios", "", *errors, ""]
    sizes = results["sizes"]
    out += [
        "## Sizes used",
        "",
        *(f"- {k}: " + ", ".join(f"{kk}={vv}" for kk, vv in v.items()) for k, v in sizes.items()),
        "",
    ]
    return "\n".join(out)


def write(results: dict[str, Any], docs: Path) -> Path:
    """Write the plot and the markdown; return the markdown's path."""
    plot_path = docs / "bench" / PLOT_NAME
    plotted = plot(results, plot_path)
    md_path = docs / "benchmarks.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    analysis_path = docs / "bench" / ANALYSIS_NAME
    analysis = analysis_path.read_text() if analysis_path.exists() else None
    md_path.write_text(markdown(results, f"bench/{PLOT_NAME}" if plotted else None, analysis))
    return md_path
