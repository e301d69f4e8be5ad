"""CPU time and resident memory of a process, read from /proc (CPU is utime+stime, not wall time)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of a process: CPU seconds used so far (all threads) and resident bytes now."""

    cpu_s: float
    rss_bytes: int


def sample(pid: int) -> Sample:
    """Read /proc/<pid>/stat and statm; raises ProcessLookupError when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return Sample(cpu_s=(utime + stime) / _TICKS_PER_S, rss_bytes=int(statm.split()[1]) * _PAGE_BYTES)


def total_cpu_s(pids: list[int]) -> float:
    """Sum of CPU seconds over several processes (e.g. every load-generator worker)."""
    return sum(sample(pid).cpu_s for pid in pids)


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy since boot (all but idle and iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS_PER_S


def tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process and all its live descendants (the harness and what it started)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        try:
            total += sample(pid).cpu_s
        except ProcessLookupError:
            continue
        todo.extend(children.get(pid, []))
    return total
