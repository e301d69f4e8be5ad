"""A real Redis Cluster on loopback: three masters on free ports, stopped, killed and restarted one by one."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from fleet.redis_server import REDIS_CLI, START_DEADLINE_S, RedisServer


class RedisCluster:
    """Three masters (and `replicas` replicas of each), slots split evenly by `redis-cli --cluster create`."""

    def __init__(self, directory: Path, *, masters: int = 3, replicas: int = 0) -> None:
        self.replicas = replicas
        self.nodes = [RedisServer(directory / f"node-{n}", cluster=True) for n in range(masters * (1 + replicas))]

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
    def _ok(node: RedisServer) -> bool:
        info = node.cli("CLUSTER", "INFO")
        if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
            return False
        replication = node.cli("INFO", "replication")
        return "role:master" in replication or "master_link_status:up" in replication

    def owner_of(self, slot: int) -> RedisServer:
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

    def move_slot(self, slot: int, target: RedisServer) -> None:
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
