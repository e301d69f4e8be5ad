"""A TCP proxy for tests that can silently stop forwarding its open connections (a half-open path)."""

from __future__ import annotations

import asyncio
import contextlib


class BlackholeProxy:
    """Forwards 127.0.0.1:<port> to a target; `blackhole()` freezes the connections open so far.

    Frozen connections stay open but carry nothing in either direction, like a peer behind a
    dead NAT entry: no RST, no FIN, just silence. New connections are forwarded normally.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._generation = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def blackhole(self) -> None:
        self._generation += 1

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        generation = self._generation
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update({client_writer, upstream_writer})
        for reader, writer in ((client_reader, upstream_writer), (upstream_reader, client_writer)):
            task = asyncio.create_task(self._pipe(reader, writer, generation))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, generation: int) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if generation != self._generation:
                    continue  # blackholed: swallow, never forward, never close
                writer.write(data)
                await writer.drain()
        if generation == self._generation:
            writer.close()
