"""Command line: run scenarios against targets, save the raw results as JSON, write the report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import uvloop

from bench import report
from bench.scenarios import SCENARIOS, Bench, Sizes, publisher_setup, wait_for_quiet
from bench.targets import ROOT, TARGETS, Target, redis_server, start_target
from bench.workers import Child, LoadGen


def _default_cpus() -> tuple[str, str]:
    """Server on the first allowed CPU, everything else on the rest; no pinning on one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "", ""
    return str(cpus[0]), ",".join(str(c) for c in cpus[1:])


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("EVA_WS_"):
        raise SystemExit(f"--eva-ws-env takes EVA_WS_NAME=VALUE, not {text!r}")
    return name, value


SCENARIO_ERRORS = (RuntimeError, OSError, TimeoutError, ValueError, KeyError, ProcessLookupError)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description="Benchmark eva-ws side by side with its peers.")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from: " + ", ".join(TARGETS))
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, from: " + ", ".join(SCENARIOS))
    p.add_argument("--size", choices=["tiny", "default"], default="default", help="preset for every size knob")
    p.add_argument("--set", action="append", default=[], metavar="SCENARIO.KNOB=VALUE", help="override one knob")
    p.add_argument(
        "--eva-ws-env",
        action="append",
        default=[],
        metavar="EVA_WS_NAME=VALUE",
        help="one more setting for the eva-ws server, e.g. EVA_WS_WRITE_WINDOW_MS=5 (repeatable)",
    )
    p.add_argument("--client", choices=["picows", "aiohttp"], default="picows", help="load-generator WebSocket client")
    server_cpus, client_cpus = _default_cpus()
    p.add_argument(
        "--loadgen-processes",
        type=int,
        default=max(1, len(client_cpus.split(","))) if client_cpus else 1,
        help="worker processes holding the clients (default: one per client CPU)",
    )
    p.add_argument("--server-cpus", default=server_cpus, help="taskset CPU list for the server ('' = no pinning)")
    p.add_argument("--client-cpus", default=client_cpus, help="taskset CPU list for load generator, publisher, Redis")
    p.add_argument(
        "--nice",
        type=int,
        default=-15 if os.geteuid() == 0 else 0,
        help="scheduling niceness for every process of the run (default -15 as root: less noise on a shared machine)",
    )
    p.add_argument("--quiet-wait-s", type=float, default=10.0, help="longest wait for other load to calm down")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "bench" / "results.json", help="raw results")
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="where benchmarks.md and bench/*.png go")
    p.add_argument("--no-report", action="store_true", help="only write the JSON results")
    p.add_argument("--report-from", type=Path, metavar="JSON", help="only rewrite the report from saved results")
    p.add_argument("--log-dir", type=Path, default=ROOT / ".cache" / "bench-logs", help="server logs")
    return p.parse_args(argv)


async def run_scenario(
    name: str, target: Target, loadgen: LoadGen, sizes: Sizes, args: argparse.Namespace, out: dict[str, Any]
) -> dict[str, Any]:
    """One scenario on a fresh Redis, server and publisher, so none inherits another's memory or work."""
    server_cpus = args.server_cpus or None
    client_cpus = args.client_cpus or None
    secret = secrets.token_urlsafe(32)
    log_dir = args.log_dir / target.name / name
    log_dir.mkdir(parents=True, exist_ok=True)
    quiet = await wait_for_quiet(args.quiet_wait_s)
    async with (
        redis_server(cpus=client_cpus, log_dir=log_dir) as redis,
        start_target(target, redis_url=redis.url, secret=secret, cpus=server_cpus, log_dir=log_dir) as server,
    ):
        out["ports"] += [server.port, redis.port]
        publisher = await Child.spawn("publisher", [sys.executable, "-m", "bench.publisher"], cpus=client_cpus)
        try:
            setup = publisher_setup(target, server, redis_url=redis.url, secret=secret)
            out["publish_path"] = (await publisher.call(setup, timeout_s=30.0))["mode"]
            bench = Bench(
                target=target,
                server=server,
                loadgen=loadgen,
                publisher=publisher,
                secret=secret,
                redis_pid=redis.pid,
                quiet_wait_s=args.quiet_wait_s,
                publisher_setup=setup,
                client_cpus=client_cpus,
            )
            try:
                result = await SCENARIOS[name](bench, sizes)
            except SCENARIO_ERRORS as exc:
                traceback.print_exc(file=sys.stderr)
                # A failed scenario may leave clients behind; the next one starts clean.
                await loadgen.close_all()
                return {"error": f"{type(exc).__name__}: {exc}"[:500], "server_log": server.log_tail(500)}
            if server.proc.returncode is not None:
                result["error"] = f"server exited with {server.proc.returncode}: {server.log_tail(500)}"
            result["other_cpu_before"] = quiet
            return result
        finally:
            await publisher.stop()


async def run_target(target: Target, scenarios: list[str], sizes: Sizes, args: argparse.Namespace) -> dict[str, Any]:
    """Run each scenario against one system; the load generator stays, everything else is fresh."""
    out: dict[str, Any] = {"description": target.description, "scenarios": {}, "ports": []}
    loadgen = await LoadGen.start(processes=args.loadgen_processes, client=args.client, cpus=args.client_cpus or None)
    try:
        for name in scenarios:
            print(f"  {target.name}: {name} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            result = await run_scenario(name, target, loadgen, sizes, args, out)
            result["wall_s"] = time.perf_counter() - started
            out["scenarios"][name] = result
    finally:
        await loadgen.stop()
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = Sizes.tiny() if args.size == "tiny" else Sizes()
    for assignment in args.set:
        sizes.override(assignment)
    scenarios = [s for s in args.scenarios.split(",") if s]
    targets = [t for t in args.targets.split(",") if t]
    for name in scenarios:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    for name in targets:
        if name not in TARGETS:
            raise SystemExit(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    eva_ws_env = dict(_setting(text) for text in args.eva_ws_env)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": " ".join(["scripts/bench", shlex.join(sys.argv[1:])]).strip(),
        "machine": report.machine(),
        "commit": report.git_commit(),
        "size": args.size,
        "sizes": report.sizes_json(sizes),
        "client": args.client,
        "eva_ws_env": eva_ws_env,
        "loadgen_processes": args.loadgen_processes,
        "server_cpus": args.server_cpus,
        "nice": args.nice,
        "client_cpus": args.client_cpus,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "targets": {},
    }
    started = time.perf_counter()
    for name in targets:
        target = TARGETS[name]
        if name == "eva-ws" and eva_ws_env:
            target = dataclasses.replace(target, extra_env={**target.extra_env, **eva_ws_env})
        missing = target.available()
        if missing is not None:
            print(f"skipping {name}: {missing}", file=sys.stderr)
            results["targets"][name] = {"description": target.description, "skipped": missing, "scenarios": {}}
            continue
        print(f"{name}", file=sys.stderr, flush=True)
        results["targets"][name] = await run_target(target, scenarios, sizes, args)
    results["wall_s"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    os.chdir(ROOT)
    if args.report_from is not None:
        print(f"report: {report.write(json.loads(args.report_from.read_text()), args.docs)}", file=sys.stderr)
        return
    if args.nice:
        try:
            # Every process of the run inherits it: server, load generator, publisher, Redis.
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except PermissionError:
            print(f"cannot set niceness {args.nice}; running at the default", file=sys.stderr)
            args.nice = 0
    results = uvloop.run(run(args))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"results: {args.json}", file=sys.stderr)
    if not args.no_report:
        md = report.write(results, args.docs)
        print(f"report: {md}", file=sys.stderr)


if __name__ == "__main__":
    main()
