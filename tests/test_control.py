"""The control plane of one pod: revocations it missed on the control channel are loaded again."""

from __future__ import annotations

import time
from typing import Any

from service import keys
from service.app import create_app
from service.broker.memory import MemoryBroker
from service.control_commands import CONTROL_CHANNEL
from service.protocol import CloseCode
from service.revocations import MemoryRevocationStore, Revocation
from tests.conftest import connect, make_settings, token_for, wait_closed


async def test_a_revocation_missed_while_the_control_subscription_was_lost_applies_once_it_is_back(
    aiohttp_client: Any,
) -> None:
    settings = make_settings()
    store = MemoryRevocationStore()
    broker = MemoryBroker(history_size=10, history_ttl_s=60, idempotency_window_s=60)
    client = await aiohttp_client(create_app(settings, broker=broker, revocation_store=store))
    token = token_for(settings, sub="alice")
    ws = await connect(client, token)
    # Another pod stored a revocation and published it while this pod's subscription was lost.
    await store.add(Revocation.of_user("alice", int(time.time()) + 1, leeway_s=settings.jwt_leeway_s))
    async with client.get(f"/ws/transactions?token={token}") as response:
        assert response.status == 400  # not known yet: only the missing upgrade is refused
    hub = client.app[keys.HUB]
    hub.on_resubscribed([CONTROL_CHANNEL])
    assert await wait_closed(ws) == CloseCode.DISCONNECTED_BY_SERVER
    async with client.get(f"/ws/transactions?token={token}") as response:
        assert (response.status, (await response.json())["error"]) == (401, "token_revoked")
