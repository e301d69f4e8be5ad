"""Data isolation, property-based: random users, grants, subscriptions and publishes through the real app.

No client ever receives an event it is not entitled to, and every entitled event arrives exactly once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from tests.conftest import make_settings, token_for

CUSTOMERS = ("C0", "C1", "C2", "C3")
USERS = ("U0", "U1", "U2", "U3", "U4")
TXNS = ("T0", "T1", "T2")
TRANSACTION_TYPES = ("transaction_new", "stage_change", "transaction_delete")


@dataclass(frozen=True)
class Request:
    channel: str
    routing_id: str
    transaction_ids: frozenset[str] | None

    @property
    def key(self) -> str:
        return f"{self.channel}:{self.routing_id}"


@dataclass(frozen=True)
class Event:
    channel: str
    routing_id: str
    kind: str
    txn_id: str | None

    @property
    def key(self) -> str:
        return f"{self.channel}:{self.routing_id}"


requests = st.one_of(
    st.builds(
        Request,
        st.just("transactions"),
        st.sampled_from(CUSTOMERS),
        st.none() | st.frozensets(st.sampled_from(TXNS), min_size=1, max_size=2),
    ),
    st.builds(Request, st.sampled_from(["user_updates", "notifications"]), st.sampled_from(USERS), st.none()),
)
events = st.one_of(
    st.builds(
        Event,
        st.just("transactions"),
        st.sampled_from(CUSTOMERS),
        st.sampled_from(TRANSACTION_TYPES),
        st.sampled_from(TXNS),
    ),
    st.builds(Event, st.just("user_updates"), st.sampled_from(USERS), st.just("user_update"), st.none()),
    st.builds(Event, st.just("notifications"), st.sampled_from(USERS), st.just("notification"), st.none()),
)
scenarios = st.fixed_dictionaries(
    {
        "grants": st.fixed_dictionaries({u: st.frozensets(st.sampled_from(CUSTOMERS), max_size=3) for u in USERS}),
        "admin": st.none() | st.sampled_from(USERS),
        "sockets": st.lists(st.tuples(st.sampled_from(USERS), st.lists(requests, max_size=5)), min_size=1, max_size=8),
        "events": st.lists(events, min_size=1, max_size=25),
    }
)


def _allowed(scenario: dict[str, Any], user: str, request: Request) -> bool:
    if scenario["admin"] == user:
        return True
    if request.channel == "transactions":
        return request.routing_id in scenario["grants"][user]
    return request.routing_id == user


def _matches(request: Request, event: Event) -> bool:
    return request.key == event.key and (request.transaction_ids is None or event.txn_id in request.transaction_ids)


async def _run(scenario: dict[str, Any]) -> None:
    app_settings = make_settings(rate_limit_per_s="100000", rate_limit_burst="100000")
    async with TestClient(TestServer(create_app(app_settings))) as client:
        sockets = []
        granted: list[list[Request]] = []
        for user, wanted in scenario["sockets"]:
            roles = ["admin"] if scenario["admin"] == user else []
            token = token_for(app_settings, sub=user, customers=sorted(scenario["grants"][user]), roles=roles)
            ws = await client.ws_connect(f"/ws/transactions?token={token}")
            accepted: list[Request] = []
            for request in wanted:
                filters: dict[str, Any] = {}
                if request.channel == "transactions":
                    filters["customerId"] = request.routing_id
                    if request.transaction_ids is not None:
                        filters["transactionIds"] = sorted(request.transaction_ids)
                else:
                    filters["userId"] = request.routing_id
                await ws.send_json({"type": "subscribe", "channel": request.channel, "filters": filters})
                reply = await ws.receive_json(timeout=10)
                duplicate = any(a.key == request.key for a in accepted)
                if not _allowed(scenario, user, request):
                    assert (reply["type"], reply.get("code")) == ("error", "forbidden"), (user, request, reply)
                elif duplicate:
                    assert reply.get("code") == "already_subscribed", reply
                else:
                    assert reply["type"] == "subscribed", (user, request, reply)
                    accepted.append(request)
            sockets.append(ws)
            granted.append(accepted)

        publisher = token_for(app_settings, sub="backend", customers=[], roles=["publisher"])
        published: list[tuple[Event, str]] = []
        for index, event in enumerate(scenario["events"]):
            body: dict[str, Any] = {"type": event.kind, "channel": event.channel}
            if event.channel == "transactions":
                body["data"] = {"id": event.txn_id, "customerId": event.routing_id, "status": "s", "stage": "k"}
            else:
                body["userId"] = event.routing_id
                body["data"] = {"n": index}
            response = await client.post("/api/v1/publish", json=body, headers={"Authorization": f"Bearer {publisher}"})
            assert response.status == 202, await response.text()
            published.append((event, (await response.json())["correlationId"]))

        for ws, accepted in zip(sockets, granted, strict=True):
            expected = Counter(cid for event, cid in published for r in accepted if _matches(r, event))
            received: Counter[str] = Counter()
            for _ in range(sum(expected.values())):
                message = await ws.receive_json(timeout=10)
                assert message["type"] not in ("error", "pong"), message
                received[message["correlationId"]] += 1
            assert received == expected
            # Nothing else was queued for this client before its pong.
            await ws.send_json({"type": "ping", "correlationId": "end"})
            assert (await ws.receive_json(timeout=10))["correlationId"] == "end"
            await ws.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios)
def test_clients_receive_exactly_their_entitled_events(scenario):
    asyncio.run(_run(scenario))
