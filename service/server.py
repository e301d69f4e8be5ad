"""The process: listening sites (main, ops, TLS), signal handling and the drain before exit."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import signal
import ssl
from typing import Any, Final

from aiohttp import web

from service import keys
from service.app import create_app
from service.config import Settings
from service.drain import drain
from service.http_protocol import AppRunner
from service.log import AccessLogger, get_logger
from service.ops import create_ops_app

log = get_logger("eva_ws.server")

# Pending connections the kernel queues while the loop is busy (aiohttp's default is 128, which
# a reconnect storm after a pod loss overflows); the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG: Final = 4096
# Allocations between young-generation collections (CPython's default is 700). A connect storm
# keeps most of what it allocates (each socket's objects): measured with scripts/bench storm,
# 10,000 spent 450-490 µs of CPU per handshake, 50,000 about 390-450. In the fan-out nearly
# everything dies young by reference counting, so collections stay small either way.
GC_GEN0_THRESHOLD: Final = 50_000


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def server_options(settings: Settings) -> dict[str, Any]:
    """Options of aiohttp's HTTP server for every connection (also used by the tests' servers)."""
    # keepalive_timeout is the only bound aiohttp puts on a connection that has not sent a
    # complete request yet: headers trickled one byte at a time (slowloris) end with it.
    # No TCP keep-alive: WebSocket heartbeats find dead peers within seconds where the kernel's
    # probes start after two hours, and switching it on costs every handshake a socket object
    # and a system call.
    # The request-head budget is the one bound on a head's size: aiohttp's own 8,190 bytes per
    # line or field would refuse a long header or URL within it with a plain 400.
    head_bytes = settings.max_request_head_bytes
    return {
        "keepalive_timeout": settings.handshake_timeout_s,
        "tcp_keepalive": False,
        "max_line_size": head_bytes,
        "max_field_size": head_bytes,
    }


def _settle_garbage_collector() -> None:
    """Keep the cycle collector's pauses short and rare on a pod holding many sockets.

    A full collection walks every tracked object; most of them are the imported libraries,
    which live as long as the process. Freezing what exists after start-up takes them out
    of every later collection, and a higher first threshold makes collections rarer while
    the fan-out allocates short-lived frames. Without this a full collection stalled the
    loop for tens of milliseconds, which showed up as the fan-out's p99.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 10, 10)


class CannotListen(Exception):
    """A listening socket could not be opened; the message names the address, why, and what to change."""


async def _listen(site: web.TCPSite, *, host: str, port: int, setting: str) -> None:
    try:
        await site.start()
    except OSError as exc:
        message = f"cannot listen on {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}"
        if exc.errno == errno.EADDRINUSE:
            message += f" (another process has it; choose another port with {setting})"
        raise CannotListen(message) from None


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop; raise CannotListen if a port cannot be opened."""
    app = create_app(settings)
    runners: list[web.AppRunner] = []
    runner = AppRunner(
        app,
        head_budget_bytes=settings.max_request_head_bytes,
        handle_signals=False,
        access_log_class=AccessLogger,
        shutdown_timeout=5.0,
        **server_options(settings),
    )
    try:
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(
            runner, settings.host, settings.port, ssl_context=_ssl_context(settings), backlog=LISTEN_BACKLOG
        )
        await _listen(site, host=settings.host, port=settings.port, setting="--port or EVA_WS_PORT")
        if settings.ops_port:
            ops_runner = web.AppRunner(create_ops_app(app), handle_signals=False, access_log=None)
            await ops_runner.setup()
            runners.append(ops_runner)
            ops_site = web.TCPSite(ops_runner, settings.host, settings.ops_port)
            await _listen(ops_site, host=settings.host, port=settings.ops_port, setting="EVA_WS_OPS_PORT")
    except CannotListen:
        # Stop what already started (broker, background tasks) instead of leaving it to the loop's teardown.
        for each in reversed(runners):
            await each.cleanup()
        raise

    # Before the start is announced: a signal sent as soon as it is seen must already drain.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    _settle_garbage_collector()
    scheme = "https" if settings.tls_cert else "http"
    log.info(
        "server_started",
        url=f"{scheme}://{settings.host}:{settings.port}",
        ops_port=settings.ops_port or settings.port,
        mode=settings.mode,
        broker="redis" if settings.redis_url else "memory",
    )
    await stopping.wait()
    # A second signal during the drain (Ctrl-C again) closes the remaining sockets at once,
    # with their close frames, instead of ending the process in the middle of the drain.
    hurry = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, hurry.set)

    lifecycle = app[keys.LIFECYCLE]
    # The delay lets a load balancer move sockets elsewhere before they close; with none open
    # there is nothing to move (new upgrades already get 503), so Ctrl-C stops at once.
    delay_s = settings.drain_delay_s if lifecycle.connections else 0.0
    await drain(lifecycle, delay_s=delay_s, spread_s=settings.drain_spread_s, hurry=hurry)
    for each in reversed(runners):
        await each.cleanup()
    log.info("server_stopped")
