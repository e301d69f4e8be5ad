"""Speed-of-light reference: aiohttp + Redis pub/sub, one pre-built frame written to every transport.

It authenticates and authorizes like the others but skips everything a product needs on the
hot path (per-client queues, offsets, history, metrics): what is left is the cost of the
event loop, the Redis reader and the socket writes.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
from collections import defaultdict

import orjson
import redis.asyncio as aioredis
import uvloop
from aiohttp import WSMsgType, web

from bench.peers.auth import allowed_customers, secret_from_env

_SUBSCRIBED = '{"type":"subscribed"}'
_FORBIDDEN = '{"type":"error","code":"forbidden"}'


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented server-to-client text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


class FanOut:
    """Channel -> open transports; Redis SUBSCRIBE on a channel's first listener, UNSUBSCRIBE on its last."""

    def __init__(self, redis_url: str) -> None:
        self.rooms: dict[str, set[asyncio.Transport]] = defaultdict(set)
        self._redis = aioredis.from_url(redis_url)
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # A placeholder subscription lets the reader block on the connection from the start.
        await self._pubsub.subscribe("bench:raw:noop")
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self._pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
        await self._redis.aclose()

    async def join(self, channel: str, transport: asyncio.Transport) -> None:
        room = self.rooms[channel]
        room.add(transport)
        if len(room) == 1:
            await self._pubsub.subscribe(channel)

    async def leave(self, channel: str, transport: asyncio.Transport) -> None:
        room = self.rooms.get(channel)
        if room is None:
            return
        room.discard(transport)
        if not room:
            del self.rooms[channel]
            await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        async for message in self._pubsub.listen():
            room = self.rooms.get(message["channel"].decode())
            if not room:
                continue
            frame = text_frame(message["data"])
            for transport in room:
                if not transport.is_closing():
                    transport.write(frame)


FANOUT = web.AppKey("fanout", FanOut)
SECRET = web.AppKey("secret", str)


async def websocket(request: web.Request) -> web.StreamResponse:
    customers = allowed_customers(request.query.get("token", ""), request.app[SECRET])
    if customers is None:
        raise web.HTTPUnauthorized(text='{"error":"unauthorized"}', content_type="application/json")
    ws = web.WebSocketResponse(compress=False, heartbeat=None)
    await ws.prepare(request)
    transport = request.transport
    assert transport is not None
    fanout = request.app[FANOUT]
    joined: list[str] = []
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            body = orjson.loads(msg.data)
            customer = str(body.get("filters", {}).get("customerId", ""))
            if body.get("type") != "subscribe" or customer not in customers:
                await ws.send_str(_FORBIDDEN)
                continue
            channel = f"transactions:{customer}"
            await fanout.join(channel, transport)
            joined.append(channel)
            await ws.send_str(_SUBSCRIBED)
    finally:
        for channel in joined:
            await fanout.leave(channel, transport)
    return ws


async def serve(port: int, redis_url: str) -> None:
    app = web.Application()
    app[SECRET] = secret_from_env()
    app[FANOUT] = fanout = FanOut(redis_url)
    app.router.add_get("/ws", websocket)
    await fanout.start()
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    # aiohttp's default listen backlog (128), as eva-ws uses.
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await fanout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.redis_url))


if __name__ == "__main__":
    main()
