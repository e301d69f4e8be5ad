"""`scripts/chaos`: its schedule is fixed by the seed, its proxy holds traffic without losing it, and a seeded
60-second run over the real topology finds no lost, duplicated or reordered event."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleet import ROOT
from fleet.chaos.faults import FaultKind, schedule
from fleet.chaos.proxy import HoldingProxy

SEED = 2


def test_the_schedule_depends_only_on_the_seed_and_fills_the_duration():
    kinds = list(FaultKind)
    first = schedule(SEED, 600, kinds)
    assert first == schedule(SEED, 600, kinds)
    assert first != schedule(SEED + 1, 600, kinds)
    assert {step.kind for step in first} == set(kinds)
    assert sum(step.gap_s + step.duration_s for step in first) <= 600


async def test_a_held_proxy_delivers_nothing_until_released_then_everything():
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await HoldingProxy(port).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        proxy.hold()
        writer.write(b"during")
        read = asyncio.ensure_future(reader.readexactly(6))
        done, _ = await asyncio.wait([read], timeout=0.5)
        assert not done, "a held link forwarded data"
        proxy.release()
        assert await read == b"during"
        writer.close()
    finally:
        await proxy.close()
        server.close()


@pytest.mark.timeout(600)
def test_a_seeded_60_second_run_loses_and_duplicates_nothing(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "fleet.chaos", "--seed", str(SEED), "--duration", "60", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["report"]["lost"] == summary["report"]["duplicated"] == 0
    assert summary["report"]["events"] > 0
    assert summary["report"]["deliveries"] >= summary["report"]["events"]
    assert len(summary["faults"]) > 0
