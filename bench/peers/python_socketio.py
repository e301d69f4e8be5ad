"""python-socketio peer: AsyncServer on aiohttp (uvloop) with AsyncRedisManager, websocket transport only.

Publishers reach it the way python-socketio documents for external processes: a separate
``AsyncRedisManager(url, write_only=True).emit(event, data, room=...)``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import socketio  # type: ignore[import-not-found,import-untyped,unused-ignore]  # ships no type information
import uvloop
from aiohttp import web

from bench.peers.auth import allowed_customers, secret_from_env


def build_server(redis_url: str, secret: str) -> Any:
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        client_manager=socketio.AsyncRedisManager(redis_url),
        transports=["websocket"],
        # Compression off, as for every system in the benchmark (permessage-deflate is also
        # never negotiated: the load generator does not offer it).
        http_compression=False,
        cors_allowed_origins="*",
    )

    async def connect(sid: str, environ: dict[str, Any], auth: dict[str, Any] | None) -> bool:
        customers = allowed_customers(str((auth or {}).get("token", "")), secret)
        if customers is None:
            return False
        await sio.save_session(sid, {"customers": customers})
        return True

    async def subscribe(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        session = await sio.get_session(sid)
        customer = str(data.get("customerId", ""))
        if customer not in session["customers"]:
            return {"type": "error", "code": "forbidden"}
        await sio.enter_room(sid, f"transactions:{customer}")
        return {"type": "subscribed"}

    sio.on("connect", connect)
    sio.on("subscribe", subscribe)
    return sio


async def serve(port: int, redis_url: str) -> None:
    app = web.Application()
    build_server(redis_url, secret_from_env()).attach(app)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.redis_url))


if __name__ == "__main__":
    main()
