"""A RESP2 PUB/SUB connection to one Redis node: an asyncio protocol feeding received bytes straight into hiredis."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, cast

import hiredis
from redis._parsers import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import AuthenticationError, InvalidResponse, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# One recv_into fills at most this much: a burst of small messages is parsed in one pass.
READ_BUFFER_BYTES: Final = 256 * 1024

# The reply kinds of a message push, per PUB/SUB flavour (the channel and payload follow).
MESSAGE: Final = b"message"
SHARD_MESSAGE: Final = b"smessage"

# What a command argument may be: encoded as UTF-8 when it is text.
Argument = bytes | str | int


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect: the node, TLS, credentials, client name, timeouts and keepalive.

    `path` is a unix socket (then `host` and `port` are unused); `ssl_context` None means
    plain TCP; `connect_timeout_s` / `command_timeout_s` None mean no limit; `keepalive`
    None means no TCP keepalive, else the TCP_KEEP* options to set.
    """

    host: str
    port: int
    path: str | None = None
    ssl_context: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    client_name: str | None = None
    connect_timeout_s: float | None = None
    command_timeout_s: float | None = None
    keepalive: Mapping[int, int] | None = field(default=None)

    @classmethod
    def of_client(cls, client: Redis) -> Endpoint:
        """The endpoint of the connections `client` would open, with the same options.

        Read from the connection redis-py would build (no I/O), so the URL's TLS query
        options, credentials and the options of `redis_client.client_options` mean the same
        to this connection as to every other Redis connection of the pod. The URL's database
        is not selected: PUB/SUB channels are the same in every database.
        """
        pool = client.connection_pool
        connection = pool.connection_class(**pool.connection_kwargs)
        ssl_context = connection.ssl_context.get() if isinstance(connection, SSLConnection) else None
        path = connection.path if isinstance(connection, UnixDomainSocketConnection) else None
        host: str = getattr(connection, "host", "")
        port: int = int(getattr(connection, "port", 0))
        keepalive = dict(getattr(connection, "socket_keepalive_options", None) or {})
        return cls(
            host=host,
            port=port,
            path=path,
            ssl_context=ssl_context,
            username=connection.username,
            password=connection.password,
            client_name=connection.client_name,
            connect_timeout_s=connection.socket_connect_timeout,
            command_timeout_s=connection.socket_timeout,
            keepalive=keepalive if getattr(connection, "socket_keepalive", False) else None,
        )

    @property
    def node(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}"


def encode_command(*args: Argument) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else b"%d" % arg if isinstance(arg, int) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _reply_error(message: str) -> Exception:
    # redis-py's error classes (AuthenticationError for WRONGPASS, NoPermissionError for
    # NOPERM...), so a failure reads the same in the logs as with redis-py's own connections.
    error: Exception = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
    return error


class PubSubConnection(asyncio.BufferedProtocol):
    """One PUB/SUB connection: commands out, pushes and replies in, parsed by hiredis.

    Every `message_kind` push (`message` on one Redis, `smessage` on a cluster) goes to
    `on_message(channel, payload)` straight from the read, without a task switch or a
    per-message object beyond hiredis's reply list; every other reply (subscribe and
    unsubscribe confirmations, PONGs) goes to `on_reply`. An error reply, a protocol error,
    a lost connection or an exception of a callback ends the connection: `failure` says
    why and `on_lost` is called once. Commands are written without waiting for replies;
    `drain` waits while the kernel's send buffer is full.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        message_kind: bytes,
        on_message: Callable[[bytes, bytes], None],
        on_reply: Callable[[Any], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.endpoint = endpoint
        self._message_kind = message_kind
        self._on_message = on_message
        self._on_reply = on_reply
        self._on_lost = on_lost
        self._reader = hiredis.Reader(replyError=_reply_error, protocolError=InvalidResponse)
        self._buffer = bytearray(READ_BUFFER_BYTES)
        self._view = memoryview(self._buffer)
        self._transport: asyncio.Transport | None = None
        # The handshake's replies, before on_reply takes over.
        self._handshake: asyncio.Queue[Any] | None = asyncio.Queue()
        self._writable: asyncio.Future[None] | None = None
        self.failure: Exception | None = None

    # -- connecting ----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, authenticate and name the connection, as redis-py's connections do."""
        endpoint = self.endpoint
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(endpoint.connect_timeout_s):
                if endpoint.path is not None:
                    await loop.create_unix_connection(lambda: self, endpoint.path)
                else:
                    await loop.create_connection(lambda: self, endpoint.host, endpoint.port, ssl=endpoint.ssl_context)
        except TimeoutError:
            raise RedisTimeoutError(f"Timeout connecting to {endpoint.node}") from None
        except OSError as exc:
            # Worded as redis-py words it; a TLS failure has no errno, its text says what failed.
            reason = (
                f"{exc.errno} connecting to {endpoint.node}. {exc.strerror}."
                if exc.errno
                else f"connecting to {endpoint.node}: {exc}"
            )
            raise RedisConnectionError(f"Error {reason}") from exc
        try:
            self._set_keepalive()
            await self._authenticate()
            if endpoint.client_name and await self._request("CLIENT", "SETNAME", endpoint.client_name) != b"OK":
                raise RedisConnectionError("Error setting client name")
        except BaseException:
            self.close()
            raise
        self._handshake = None

    def _set_keepalive(self) -> None:
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if sock is None or self.endpoint.keepalive is None or self.endpoint.path is not None:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in self.endpoint.keepalive.items():
            sock.setsockopt(socket.SOL_TCP, option, value)

    async def _authenticate(self) -> None:
        username, password = self.endpoint.username, self.endpoint.password
        if not (username or password):
            return
        credentials = (username or "default", password or "") if username else (password or "",)
        try:
            reply = await self._request("AUTH", *credentials)
        except ResponseError as exc:
            # A server older than 6.0 takes the password alone (redis-py retries the same way).
            if len(credentials) == 1 or "wrong number of arguments" not in str(exc):
                raise
            reply = await self._request("AUTH", credentials[-1])
        if reply != b"OK":
            raise AuthenticationError("Invalid Username or Password")

    async def _request(self, *args: Argument) -> Any:
        """One command of the handshake and its reply, within the command timeout."""
        assert self._handshake is not None, "requests are for the handshake only"
        self.send(encode_command(*args))
        try:
            async with asyncio.timeout(self.endpoint.command_timeout_s):
                reply = await self._handshake.get()
        except TimeoutError:
            raise RedisTimeoutError("Timeout reading from socket") from None
        if isinstance(reply, Exception):
            raise reply
        return reply

    # -- commands --------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write encoded commands; their replies arrive through on_reply."""
        if self._transport is None or self._transport.is_closing():
            raise self.failure or RedisConnectionError("Connection closed by server.")
        self._transport.write(data)

    async def drain(self) -> None:
        """Wait, up to the command timeout, until the kernel takes what was written."""
        if self._writable is None:
            return
        try:
            async with asyncio.timeout(self.endpoint.command_timeout_s):
                await asyncio.shield(self._writable)
        except TimeoutError:
            raise RedisTimeoutError("Timeout writing to socket") from None
        self.raise_if_lost()

    def raise_if_lost(self) -> None:
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        """Drop the connection at once: never waits for a peer that may be gone (a half-open link)."""
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.BufferedProtocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Under uvloop the transport is no asyncio.Transport subclass, though it has its methods.
        self._transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        reader = self._reader
        reader.feed(self._buffer, 0, nbytes)  # type: ignore[arg-type]  # the stub omits buffers, which hiredis takes
        message_kind = self._message_kind
        on_message = self._on_message
        try:
            while (reply := reader.gets()) is not False:
                # The hot path: a push of three bulk strings, checked by its kind only.
                if type(reply) is list and reply[0] == message_kind:
                    on_message(reply[1], reply[2])
                elif isinstance(reply, Exception):
                    if self._handshake is None:
                        self._fail(reply)  # an error in subscribed mode: redis-py raises it too
                        return
                    self._handshake.put_nowait(reply)
                elif self._handshake is not None:
                    self._handshake.put_nowait(reply)
                else:
                    self._on_reply(reply)
        except Exception as exc:  # noqa: BLE001  # not swallowed: `failure` ends the connection for its owner
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close the transport: a half-closed Redis connection is of no use

    def connection_lost(self, exc: Exception | None) -> None:
        if self.failure is None:
            if exc is None:
                self.failure = RedisConnectionError("Connection closed by server.")
            else:
                # Worded as redis-py words a failed read: the kernel's reason (a reset, a keepalive
                # timeout) tells an operator more than "closed by server", which it was not.
                self.failure = RedisConnectionError(f"Error while reading from {self.endpoint.node} : {exc.args}")
                self.failure.__cause__ = exc
        if self._handshake is not None:
            self._handshake.put_nowait(self.failure)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._on_lost()

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def _fail(self, exc: Exception) -> None:
        if self.failure is None:
            self.failure = exc
        self.close()
