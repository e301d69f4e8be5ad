"""Every Lua script eva-ws runs in Redis, one `.lua` file each, named after what it does.

Each file starts with a comment naming its KEYS and ARGV. A script is sent by its SHA1 with
`redis_client.eval_script` (EVAL when the node does not know it yet), on either topology.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Final


def _load(name: str) -> str:
    return files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


# The broker's wire format (docs/redis-wire-format.md): byte for byte, since other publishers
# may call them by SHA1. `publish_sharded` is `publish` with SPUBLISH, for Redis Cluster.
PUBLISH: Final = _load("publish")
PUBLISH_SHARDED: Final = _load("publish_sharded")
# `publish` for several events in one call, on one Redis (not part of the wire format other publishers use).
PUBLISH_BATCH: Final = _load("publish_batch")
HISTORY: Final = _load("history")
SNAPSHOT: Final = _load("snapshot")
PRESENCE_APPLY: Final = _load("presence_apply")
PRESENCE_READ: Final = _load("presence_read")
LEASES_APPLY: Final = _load("leases_apply")
LEASES_REFRESH: Final = _load("leases_refresh")
REBALANCE_REPORT: Final = _load("rebalance_report")
