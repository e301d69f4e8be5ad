"""A loopback TCP forwarder that can hold its traffic, as a black-holed route or a stalled peer does."""

from __future__ import annotations

import asyncio
import contextlib

from fleet.ports import free_port

CHUNK_BYTES = 65_536


class HoldingProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target_port>; `hold()` stops all traffic until `release()`.

    While held, nothing is read on either side, so nothing is lost: the kernel buffers fill and
    the peers see no progress, as behind a route that drops every packet (TCP retransmits until it
    comes back). New connections are accepted but not connected through until the release.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def held(self) -> bool:
        return not self._flowing.is_set()

    async def start(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.add(client_writer)
        try:
            await self._flowing.wait()
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                return
            self._writers.add(upstream_writer)
            pumps = [
                asyncio.ensure_future(self._pump(client_reader, upstream_writer)),
                asyncio.ensure_future(self._pump(upstream_reader, client_writer)),
            ]
            self._tasks.update(pumps)
            try:
                await asyncio.gather(*pumps, return_exceptions=True)
            finally:
                self._tasks.difference_update(pumps)
                upstream_writer.close()
                self._writers.discard(upstream_writer)
        finally:
            client_writer.close()
            self._writers.discard(client_writer)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                await self._flowing.wait()
                data = await source.read(CHUNK_BYTES)
                if not data:
                    break
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()
