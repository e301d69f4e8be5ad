"""A TCP proxy for tests that can partition the network silently: no RST, no FIN, just no bytes."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


@dataclass
class _Link:
    frozen: bool


class PartitionProxy:
    """Forwards 127.0.0.1:<port> to a target port.

    `partition()` freezes every open connection and every new one: they stay open but
    carry nothing in either direction, like peers behind a dead NAT entry or a dropped
    route. `heal()` lets new connections through again; frozen ones stay frozen.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._partitioned = False
        self._links: list[_Link] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def partition(self) -> None:
        self._partitioned = True
        for link in self._links:
            link.frozen = True

    def heal(self) -> None:
        self._partitioned = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        link = _Link(frozen=self._partitioned)
        self._links.append(link)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update({client_writer, upstream_writer})
        for reader, writer in ((client_reader, upstream_writer), (upstream_reader, client_writer)):
            task = asyncio.create_task(self._pipe(reader, writer, link))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if link.frozen:
                    continue  # swallow: never forward, never close
                writer.write(data)
                await writer.drain()
        if not link.frozen:
            writer.close()
