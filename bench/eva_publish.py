"""Publishing into eva-ws the way a backend service does: its own library over Redis, else HTTP.

With a Redis broker configured, `service.publisher` validates and encodes each event and the
broker's Lua script assigns offsets, appends history and PUBLISHes, all in this process, so
the pod under test only pays for fan-out. When the service has no cross-process broker
(no Redis URL), events go through POST /api/v1/publish in batches
and the pod pays for publishing too; `mode` says which path was taken.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final, Literal

import aiohttp
import jwt
import orjson

EVENT_TYPE: Final = "transaction_update"
# The endpoint takes up to 1,000 events per request; smaller batches keep latency low.
HTTP_BATCH_MAX: Final = 256
COMMAND_TIMEOUT_S: Final = 10.0


class EvaPublisher:
    """publish_many([(customer, payload)]) through the library or the HTTP API."""

    def __init__(self, *, redis_url: str, http_url: str, secret: str) -> None:
        self._redis_url = redis_url
        self._http_url = http_url
        self._secret = secret
        self.mode: Literal["library", "http"] = "http"
        self._publisher: Any = None
        self._broker: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] = {}

    async def start(self) -> None:
        from service.broker.redis import RedisBroker
        from service.config import load_settings
        from service.publisher import Publisher

        settings = load_settings(
            {
                "EVA_WS_MODE": "development",
                "EVA_WS_REDIS_URL": self._redis_url,
                "EVA_WS_JWT_SECRET": self._secret,
                "EVA_WS_POD_ID": "bench-publisher",
            }
        )
        if settings.redis_url is None:
            # Without Redis the pod's broker is in-process: only its HTTP API reaches it.
            now = int(time.time())
            claims = {"sub": "bench-publisher", "roles": ["publisher"], "iat": now, "exp": now + 24 * 3600}
            self._headers = {"Authorization": "Bearer " + jwt.encode(claims, self._secret, "HS256")}
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
            self.mode = "http"
            return
        # On a machine shared with other work Redis may stall for a few seconds: the publisher
        # waits for it rather than failing the scenario (the pods keep their own default).
        broker = RedisBroker.from_settings(settings, command_timeout_s=COMMAND_TIMEOUT_S)
        await broker.start()
        self._broker = broker
        self._publisher = Publisher(broker)
        self.mode = "library"

    async def publish_many(self, batch: Sequence[tuple[str, bytes]]) -> None:
        if self._publisher is not None:
            from service.publisher import prepare_event

            events = [prepare_event(EVENT_TYPE, orjson.loads(payload)) for _, payload in batch]
            await self._publisher.publish_prepared(events)
            return
        assert self._session is not None
        for i in range(0, len(batch), HTTP_BATCH_MAX):
            # The payload is already JSON: splice it in rather than parse and re-encode it.
            body = (
                b'{"events":['
                + b",".join(
                    b'{"type":"' + EVENT_TYPE.encode() + b'","data":' + p + b"}"
                    for _, p in batch[i : i + HTTP_BATCH_MAX]
                )
                + b"]}"
            )
            async with self._session.post(
                f"{self._http_url}/api/v1/publish",
                data=body,
                headers={**self._headers, "Content-Type": "application/json"},
            ) as response:
                if response.status != 202:
                    raise RuntimeError(f"publish failed: {response.status} {(await response.text())[:200]}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._broker is not None:
            await self._broker.close()
