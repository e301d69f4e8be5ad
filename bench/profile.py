"""Profile a server with py-spy under a steady fan-out, many-channels or ingest load, or a connect storm.

    scripts/bench profile --target eva-ws --subscribers 1000 --rate 40 --seconds 20
    scripts/bench profile --target eva-ws --channels --rate 2621
    scripts/bench profile --target eva-ws --ingest --rate 40000
    scripts/bench profile --target eva-ws --storm --subscribers 15000 --customers 100

`--channels` is the many-channels workload of `scripts/bench --scenarios channels` held at one
rate: 10,000 subscribers over 1,000 customer channels, events round-robin over the customers
(about 10 deliveries each). `--ingest` is the ingest scenario's: events round-robin over 10,000
channels, 5,000 of them with one subscriber each. Both publish as their scenarios do (pre-encoded
messages in pipelined PUBLISH, see bench.ingest_publisher).

Samples come from ``py-spy record --format raw`` (collapsed stacks, non-blocking so the server
is not paused). Self time is where a sample's innermost Python frame was; inclusive time
counts a function once per sample it appears in. Time spent in C code (uvloop, the kernel)
is charged to the Python frame that called it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import secrets
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import uvloop

from bench.scenarios import Bench, publish_pre_encoded, publisher_setup
from bench.targets import ROOT, TARGETS, redis_server, start_target
from bench.workers import Child, LoadGen

SAMPLE_RATE_HZ: Final = 250
# The many-channels scenario's size (bench/scenarios.py ChannelsSize) and one step of its ladder.
CHANNELS_SUBSCRIBERS: Final = 10_000
CHANNELS_CUSTOMERS: Final = 1000
CHANNELS_RATE: Final = 2621.0
# The ingest scenario's size (bench/scenarios.py IngestSize) and a rate the pod takes without falling behind.
INGEST_SUBSCRIBERS: Final = 5000
INGEST_CHANNELS: Final = 10_000
INGEST_RATE: Final = 40_000.0
_LINE: Final = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
# "function (path/to/file.py:123)" -> "function (file.py)": lines split one function into many.
_FRAME: Final = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


@dataclass(frozen=True, slots=True)
class Profile:
    samples: int
    self_counts: Counter[str]
    inclusive_counts: Counter[str]


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    path = m.group("file")
    parts = Path(path).parts
    # Keep the package-relative path for the project's own code and the file name elsewhere.
    short = "/".join(parts[parts.index("service") :]) if "service" in parts else Path(path).name
    return f"{m.group('func')} ({short})"


def parse_collapsed(text: str) -> Profile:
    """Aggregate py-spy raw output (``frame;frame;... count`` per line) by function."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m is None:
            continue
        count = int(m.group("count"))
        # The first element is the thread ("process 123:\"...\";thread (0x..)") when py-spy adds it.
        frames = [
            _frame_name(f) for f in m.group("stack").split(";") if f and not f.startswith(("process ", "thread "))
        ]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return Profile(total, self_counts, inclusive)


def to_markdown(profile: Profile, *, title: str, seconds: float, native: bool = False, top: int = 15) -> str:
    where_c_goes = (
        [
            "Sampled with `--native`: C functions (libc's `write` and `epoll_pwait`, uvloop's) are frames of",
            "their own, and py-spy paused the server for each sample, so it ran slower than unprofiled.",
        ]
        if native
        else [
            "Self time of `Runner.run` is the event loop's own C code (uvloop: epoll, socket reads, scheduling);",
            "C code called from Python (socket writes, JSON encoding) is charged to its Python caller.",
        ]
    )
    lines = [
        f"# {title}",
        "",
        f"{profile.samples} samples over {seconds:.0f} s at {SAMPLE_RATE_HZ} Hz "
        f"(≈{profile.samples / (seconds * SAMPLE_RATE_HZ):.0%} of one core busy in Python frames).",
        *where_c_goes,
        "",
        "## Self time (innermost Python frame)",
        "",
        "| share | samples | function |",
        "|---:|---:|---|",
    ]
    for name, n in profile.self_counts.most_common(top):
        lines.append(f"| {n / profile.samples:.1%} | {n} | `{name}` |")
    lines += ["", "## Inclusive time", "", "| share | samples | function |", "|---:|---:|---|"]
    for name, n in profile.inclusive_counts.most_common(top):
        lines.append(f"| {n / profile.samples:.1%} | {n} | `{name}` |")
    return "\n".join(lines) + "\n"


async def _start_py_spy(
    py_spy: str, pid: int, raw_path: Path, *, native: bool, seconds: float | None = None
) -> asyncio.subprocess.Process:
    """py-spy sampling `pid` for `seconds`, or until it gets SIGINT."""
    duration = ["--duration", str(int(seconds))] if seconds is not None else []
    return await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(pid), *duration,
        "--rate", str(SAMPLE_RATE_HZ), "--format", "raw", "--output", str(raw_path),
        "--native" if native else "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _finish_py_spy(spy: asyncio.subprocess.Process, timeout_s: float) -> None:
    try:
        _, err = await asyncio.wait_for(spy.communicate(), timeout_s)
    finally:
        if spy.returncode is None:
            spy.kill()
            await spy.wait()
    # py-spy exits with 0 when it ends by itself and may report SIGINT's status when stopped.
    if spy.returncode not in (0, -signal.SIGINT, 128 + signal.SIGINT):
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-1000:]}")


async def profile_target(args: argparse.Namespace, raw_path: Path) -> float:
    """Run the load, leave py-spy's collapsed stacks in `raw_path`, and return the seconds sampled."""
    target = TARGETS[args.target]
    secret = secrets.token_urlsafe(32)
    log_dir = ROOT / ".cache" / "bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    async with (
        redis_server(cpus=args.client_cpus or None, log_dir=log_dir) as redis,
        start_target(
            target, redis_url=redis.url, secret=secret, cpus=args.server_cpus or None, log_dir=log_dir
        ) as server,
    ):
        publisher = await Child.spawn("publisher", [sys.executable, "-m", "bench.publisher"], cpus=args.client_cpus)
        loadgen = await LoadGen.start(processes=1, client="picows", cpus=args.client_cpus or None)
        try:
            setup = publisher_setup(target, server, redis_url=redis.url, secret=secret)
            await publisher.call(setup, timeout_s=30.0)
            bench = Bench(
                target=target,
                server=server,
                loadgen=loadgen,
                publisher=publisher,
                secret=secret,
                redis_pid=redis.pid,
                publisher_setup=setup,
            )
            if args.ingest:
                # Subscriber i on channel i: the channels past the subscribers have none on the pod.
                customers = [f"I{i}" for i in range(args.customers)]
                clients = bench.tokens(customers[: args.subscribers])
            else:
                # Subscribers spread round-robin over the customers, as in the many-channels scenario.
                customers = [f"C{i}" for i in range(args.customers)]
                clients = bench.tokens([customers[i % len(customers)] for i in range(args.subscribers)])
            if args.storm:
                spy = await _start_py_spy(py_spy, server.pid, raw_path, native=args.native)
                # Let py-spy attach before the first handshake.
                await asyncio.sleep(1.0)
                result = await bench.connect(clients, concurrency=args.concurrency)
                spy.send_signal(signal.SIGINT)
                await _finish_py_spy(spy, 30)
                print(f"{result['ok']} handshakes in {result['elapsed_s']:.1f} s", file=sys.stderr)
                return float(result["elapsed_s"])
            if args.channels or args.ingest:
                await publish_pre_encoded(bench)
                await bench.restart_sequences()
            await bench.connect(clients, concurrency=50 if args.ingest else 200)
            publishing = asyncio.create_task(bench.publish(customers, args.rate, args.seconds + 2))
            await asyncio.sleep(1.0)
            spy = await _start_py_spy(py_spy, server.pid, raw_path, native=args.native, seconds=args.seconds)
            await _finish_py_spy(spy, args.seconds + 30)
            pub = await publishing
            drained = await loadgen.drain(pub["published"], timeout_s=30.0)
            print(f"published {pub['sent']}, lost {drained['lost']}, dup {drained['dups']}", file=sys.stderr)
            return float(args.seconds)
        finally:
            with contextlib.suppress(RuntimeError, TimeoutError):
                await loadgen.close_all()
            await loadgen.stop()
            await publisher.stop()


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/bench profile", description=__doc__.splitlines()[0])
    p.add_argument("--target", default="eva-ws", choices=[n for n, t in TARGETS.items() if t.name != "node-socketio"])
    p.add_argument(
        "--subscribers",
        type=int,
        default=None,
        help=f"default 1000, {CHANNELS_SUBSCRIBERS} with --channels, {INGEST_SUBSCRIBERS} with --ingest",
    )
    p.add_argument(
        "--customers",
        type=int,
        default=None,
        help=f"channels the subscribers are spread over (default 1, {CHANNELS_CUSTOMERS} with --channels); "
        f"with --ingest, the channels published to ({INGEST_CHANNELS}), the first --subscribers of them subscribed",
    )
    p.add_argument("--native", action="store_true", help="sample C frames too (pauses the server for each sample)")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help=f"events per second over all channels (default 20, {CHANNELS_RATE:g} with --channels, "
        f"{INGEST_RATE:g} with --ingest)",
    )
    p.add_argument("--channels", action="store_true", help="the many-channels workload (see above)")
    p.add_argument("--ingest", action="store_true", help="the ingest workload (see above)")
    p.add_argument("--seconds", type=float, default=20.0, help="how long py-spy samples")
    p.add_argument("--storm", action="store_true", help="sample while the subscribers connect instead")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight with --storm")
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--client-cpus", default="1")
    p.add_argument("--out", type=Path, default=None, help="markdown output (default docs/bench/profile-<target>.md)")
    args = p.parse_args()
    if args.storm + args.channels + args.ingest > 1:
        p.error("--storm, --channels and --ingest exclude each other")
    workload = "channels" if args.channels else "ingest" if args.ingest else None
    if args.subscribers is None:
        args.subscribers = {"channels": CHANNELS_SUBSCRIBERS, "ingest": INGEST_SUBSCRIBERS}.get(workload or "", 1000)
    if args.customers is None:
        args.customers = {"channels": CHANNELS_CUSTOMERS, "ingest": INGEST_CHANNELS}.get(workload or "", 1)
    if args.rate is None:
        args.rate = {"channels": CHANNELS_RATE, "ingest": INGEST_RATE}.get(workload or "", 20.0)
    if args.out is None:
        kind = "storm-" if args.storm else f"{workload}-" if workload else ""
        args.out = ROOT / "docs" / "bench" / f"profile-{kind}{args.target}.md"
    out: Path = args.out
    # Collapsed stacks (for flamegraph tools) stay out of the repository.
    raw_path = ROOT / ".cache" / "bench-logs" / f"profile-{args.target}.collapsed.txt"
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = uvloop.run(profile_target(args, raw_path))
    profile = parse_collapsed(raw_path.read_text())
    if args.storm:
        title = (
            f"{args.target} connect-storm profile: {args.subscribers} handshakes over {args.customers} channel(s), "
            f"{args.concurrency} in flight"
        )
    elif args.channels:
        title = (
            f"{args.target} many-channels profile: {args.subscribers} subscribers over {args.customers} channels, "
            f"{args.rate:g} events/s round-robin"
        )
    elif args.ingest:
        title = (
            f"{args.target} ingest profile: {args.rate:g} events/s round-robin over {args.customers} channels, "
            f"one subscriber each on the first {args.subscribers}"
        )
    else:
        title = (
            f"{args.target} fan-out profile: {args.subscribers} subscribers on {args.customers} channel(s), "
            f"{args.rate:g} events/s"
        )
    out.write_text(to_markdown(profile, title=title, seconds=seconds, native=args.native))
    print(out.read_text())


if __name__ == "__main__":
    main()
