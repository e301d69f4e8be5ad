"""A real Redis Cluster owned by the tests: three masters on free ports, stopped, killed and restarted one by one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.redis_server import REDIS_SERVER, free_port

REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
START_DEADLINE_S = 30.0


class ClusterNode:
    """One cluster-enabled redis-server; its nodes.conf survives a restart, so it rejoins with its slots."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        # Explicit, because the default (port + 10000) overflows for ports above 55535.
        self.bus_port = free_port()
        self.directory = directory / f"node-{self.port}"
        self.directory.mkdir(parents=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.process is None, "already running"
        args = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_port),
            "--cluster-config-file", str(self.directory / f"nodes-{self.port}.conf"),
            # Short enough that a killed master is flagged failed quickly, long enough for a loaded CI box.
            "--cluster-node-timeout", "2000",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_DEADLINE_S
        while self.cli("PING") != "PONG":
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.directory}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster node on port {self.port} did not answer PING")
            time.sleep(0.02)

    def kill(self) -> None:
        """kill -9: no shutdown, sockets reset by the kernel."""
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
            process.wait(timeout=START_DEADLINE_S)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts TCP connections but nothing answers (a half-open peer)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def cli(self, *args: str) -> str:
        """One redis-cli command against this node; its raw reply, or '' if the node is unreachable."""
        result = subprocess.run(
            [REDIS_CLI, "-p", str(self.port), *args], capture_output=True, text=True, timeout=START_DEADLINE_S
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    def node_id(self) -> str:
        return self.cli("CLUSTER", "MYID")


class RedisCluster:
    """Three masters (and `replicas` replicas of each), slots split evenly by `redis-cli --cluster create`."""

    def __init__(self, directory: Path, *, masters: int = 3, replicas: int = 0) -> None:
        self.replicas = replicas
        self.nodes = [ClusterNode(directory) for _ in range(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        create = [REDIS_CLI, "--cluster", "create", *(n.address for n in self.nodes)]
        create += ["--cluster-replicas", str(self.replicas)]
        subprocess.run([*create, "--cluster-yes"], check=True, capture_output=True, timeout=START_DEADLINE_S)
        self.wait_ok()

    def wait_ok(self) -> None:
        """Until every node says cluster_state:ok and agrees on who owns all 16384 slots."""
        deadline = time.monotonic() + START_DEADLINE_S
        while not all(self._ok(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    @staticmethod
    def _ok(node: ClusterNode) -> bool:
        info = node.cli("CLUSTER", "INFO")
        if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
            return False
        replication = node.cli("INFO", "replication")
        return "role:master" in replication or "master_link_status:up" in replication

    def owner_of(self, slot: int) -> ClusterNode:
        """The node that owns `slot`, as the first reachable node sees it (CLUSTER NODES)."""
        for node in self.nodes:
            if node.process is None:
                continue
            for line in node.cli("CLUSTER", "NODES").splitlines():
                fields = line.split()
                # id, ip:port@cport, flags, master, ping, pong, epoch, link state, then slots and ranges.
                port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                for part in fields[8:]:
                    if part.startswith("["):
                        continue  # a slot being migrated or imported, not owned
                    low, _, high = part.partition("-")
                    if int(low) <= slot <= int(high or low):
                        return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no node reports an owner for slot {slot}")

    def move_slot(self, slot: int, target: ClusterNode) -> None:
        """Migrate one slot with its keys, the way `redis-cli --cluster reshard` does it."""
        source = self.owner_of(slot)
        assert source is not target
        source_id, target_id = source.node_id(), target.node_id()
        target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
        source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        while True:
            keys = source.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
            if not keys:
                break
            source.cli("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *keys)
        for node in (target, source, *(n for n in self.nodes if n not in (source, target))):
            node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", target_id)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
