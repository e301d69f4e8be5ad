"""A crowd of resuming clients spread over customers, connected through a cluster's load balancer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp

from fleet.cluster import Cluster
from fleet.resuming_client import ResumingClient
from fleet.waiting import eventually
from service.auth import mint_token
from service.config import load_settings


def customers(count: int) -> list[str]:
    """`count` customer ids, CUST-001 onwards."""
    return [f"CUST-{i:03d}" for i in range(1, count + 1)]


@dataclass
class ClientFleet:
    """`per_customer` browser tabs for each customer, each with its own user and a one-customer token.

    Tokens are signed with the cluster's secret. `async with` connects every client and returns
    once all are subscribed; leaving closes them with 1000.
    """

    session: aiohttp.ClientSession
    cluster: Cluster
    customer_ids: list[str]
    per_customer: int = 2
    base_backoff_s: float = 0.1
    clients: list[ResumingClient] = field(default_factory=list)

    async def __aenter__(self) -> ClientFleet:
        settings = load_settings({"EVA_WS_JWT_SECRET": self.cluster.secret})
        for customer in self.customer_ids:
            for n in range(self.per_customer):
                user = f"{customer}-user-{n}"
                token = mint_token(settings, sub=user, customers=[customer], ttl_s=3600)
                self.clients.append(
                    ResumingClient(
                        self.session,
                        self.cluster.ws_url,
                        token,
                        routing_key=customer,
                        subscriptions=[{"channel": "transactions", "filters": {"customerId": customer}}],
                        base_backoff_s=self.base_backoff_s,
                        name=user,
                    )
                )
        for client in self.clients:
            client.start()
        try:
            await self.wait_subscribed()
        except BaseException:
            await self.__aexit__()  # `async with` does not exit what failed to enter
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.gather(*(c.stop() for c in self.clients))

    async def wait_subscribed(self, deadline_s: float = 30.0) -> None:
        await eventually(
            lambda: all(c.subscribed.is_set() for c in self.clients),
            lambda: f"{sum(not c.subscribed.is_set() for c in self.clients)} clients not subscribed",
            deadline_s=deadline_s,
        )

    def of(self, customer: str) -> list[ResumingClient]:
        return [c for c in self.clients if c.routing_key == customer]

    def totals(self) -> dict[str, int]:
        return {
            "duplicates": sum(c.duplicates for c in self.clients),
            "gaps": sum(c.gaps for c in self.clients),
            "unrecovered": sum(c.unrecovered for c in self.clients),
            "resyncs": sum(c.resyncs for c in self.clients),
            "errors": sum(len(c.errors) for c in self.clients),
        }
