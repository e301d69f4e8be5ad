"""A TCP forwarder that fails its open connections on demand: loudly (cut) or silently (freeze)."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

from fleet.ports import free_port


class _Link:
    __slots__ = ("frozen", "muted", "sockets")

    def __init__(self, *sockets: socket.socket, muted: bool = False) -> None:
        self.sockets = sockets
        self.frozen = False
        self.muted = muted


class DropProxy:
    """Forwards 127.0.0.1:<port> to a target port; new connections always go through.

    `cut()` ends every open connection at once (the browser sees 1006). `freeze()` keeps them
    open but forwards nothing more in either direction, like a peer behind a dead NAT entry:
    only a heartbeat can tell. `mute_replies()` keeps forwarding requests to the target but
    drops its answers, on open and new connections: a command that ran, whose reply was lost.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._muted = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            for sock in link.sockets:
                # shutdown() also wakes the threads blocked in recv() on it, which close() alone does not.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def freeze(self) -> None:
        with self._lock:
            for link in self._links:
                link.frozen = True

    def mute_replies(self) -> None:
        with self._lock:
            self._muted = True
            for link in self._links:
                link.muted = True

    def close(self) -> None:
        self._listener.close()
        self.cut()

    def __enter__(self) -> DropProxy:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                link = _Link(client, upstream, muted=self._muted)
                self._links.append(link)
            threading.Thread(target=self._pump, args=(client, upstream, link, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, link, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, link: _Link, replies: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not link.frozen and not (replies and link.muted):
                    sink.sendall(data)
            if not link.frozen:
                sink.shutdown(socket.SHUT_WR)
