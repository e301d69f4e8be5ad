"""PubSubConnection against a real redis-server, on asyncio's loop and on uvloop (the one pods run)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Self

import pytest
import uvloop
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from fleet.ports import free_port
from fleet.redis_server import RedisServer
from fleet.waiting import eventually
from service.broker.redis_pubsub_connection import (
    MESSAGE,
    READ_BUFFER_BYTES,
    Endpoint,
    PubSubConnection,
    encode_command,
)
from service.broker.redis_shard_link import CLASSIC, ShardLink
from service.redis_client import client_options
from tests.certificates import self_signed

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a test's coroutine on a fresh loop of either kind."""

    def runner(coroutine: Coroutine[Any, Any, None]) -> None:
        if request.param == "uvloop":
            uvloop.run(coroutine)
        else:
            asyncio.run(coroutine)

    return runner


def endpoint_of(url: str, *, client_name: str = "eva-ws:test:sub") -> Endpoint:
    """The endpoint a pod's link would use for `url`, with the pod's options."""
    options = client_options(
        url, connect_timeout_s=2.0, command_timeout_s=2.0, keepalive_idle_s=30, client_name=client_name
    )
    return Endpoint.of_client(Redis.from_url(url, **options))


class Received:
    """What a connection handed out: events, other replies, and whether it was lost."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.replies: list[Any] = []
        self.lost = asyncio.Event()

    def connection(self, endpoint: Endpoint) -> PubSubConnection:
        return PubSubConnection(
            endpoint,
            message_kind=MESSAGE,
            on_message=lambda channel, data: self.messages.append((channel, data)),
            on_reply=self.replies.append,
            on_lost=self.lost.set,
        )


async def subscribed(endpoint: Endpoint, *channels: str) -> tuple[PubSubConnection, Received]:
    """A connection subscribed to `channels`, every confirmation received."""
    received = Received()
    connection = received.connection(endpoint)
    await connection.open()
    connection.send(encode_command("SUBSCRIBE", *channels))
    await connection.drain()
    await eventually(lambda: len(received.replies) == len(channels), lambda: f"confirmations: {received.replies}")
    return connection, received


async def publish(url: str, *messages: tuple[str, bytes]) -> None:
    client = Redis.from_url(url)
    try:
        for channel, data in messages:
            assert await client.publish(channel, data) == 1
    finally:
        await client.aclose()


class LocalProxy:
    """A listener on 127.0.0.1:<port> in front of a Redis port; subclasses say what `_accept` forwards.
    Leaving it stops the listener and every task it started."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class BytewiseProxy(LocalProxy):
    """Forwards to Redis the server's bytes one write at a time with a pause between them, so the
    client reads every reply split at every byte boundary."""

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for task in (
            asyncio.create_task(self._pipe(reader, upstream_writer, bytewise=False)),
            asyncio.create_task(self._pipe(upstream_reader, writer, bytewise=True)),
        ):
            self._tasks.add(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, bytewise: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
                for chunk in chunks:
                    writer.write(chunk)
                    await writer.drain()
                    if bytewise:
                        await asyncio.sleep(0.001)  # lets each byte leave in its own segment
        writer.close()


def test_events_and_confirmations_arrive_intact_when_every_reply_is_split_at_every_byte(
    run: Runner, redis_server: RedisServer
) -> None:
    async def scenario() -> None:
        async with BytewiseProxy(redis_server.port) as proxy:
            connection, received = await subscribed(endpoint_of(f"redis://127.0.0.1:{proxy.port}/0"), "a", "bb")
            try:
                assert received.replies == [[b"subscribe", b"a", 1], [b"subscribe", b"bb", 2]]
                await publish(redis_server.url, ("a", b"e1:1:x\n{}"), ("bb", b""), ("a", b"\r\n$3\r\n*1"))
                await eventually(lambda: len(received.messages) == 3, lambda: f"messages: {received.messages}")
                assert received.messages == [(b"a", b"e1:1:x\n{}"), (b"bb", b""), (b"a", b"\r\n$3\r\n*1")]
                assert connection.failure is None
            finally:
                connection.close()

    run(scenario())


def test_a_message_larger_than_one_read_is_delivered_whole(run: Runner, redis_server: RedisServer) -> None:
    big = bytes(range(256)) * (3 * READ_BUFFER_BYTES // 256 + 7)

    async def scenario() -> None:
        connection, received = await subscribed(endpoint_of(redis_server.url), "big")
        try:
            await publish(redis_server.url, ("big", big), ("big", b"after"))
            await eventually(lambda: len(received.messages) == 2, lambda: f"{len(received.messages)} messages")
            assert received.messages == [(b"big", big), (b"big", b"after")]
        finally:
            connection.close()

    run(scenario())


def test_a_thousand_confirmations_of_one_command_all_arrive_in_order(run: Runner, redis_server: RedisServer) -> None:
    channels = [f"channel-{n}" for n in range(1000)]

    async def scenario() -> None:
        connection, received = await subscribed(endpoint_of(redis_server.url), *channels)
        try:
            assert received.replies == [[b"subscribe", c.encode(), n + 1] for n, c in enumerate(channels)]
        finally:
            connection.close()

    run(scenario())


def test_connection_refused_is_a_redis_connection_error(run: Runner) -> None:
    async def scenario() -> None:
        connection = Received().connection(endpoint_of(f"redis://127.0.0.1:{free_port()}/0"))
        with pytest.raises(RedisConnectionError, match=r"connecting to 127\.0\.0\.1"):
            await connection.open()

    run(scenario())


def test_the_connection_carries_the_client_name_of_the_url_options(run: Runner, redis_server: RedisServer) -> None:
    async def scenario() -> None:
        connection, _ = await subscribed(endpoint_of(redis_server.url, client_name="eva-ws:pod-7:sub"), "x")
        client = Redis.from_url(redis_server.url)
        try:
            names = [c["name"] for c in await client.client_list()]
            assert "eva-ws:pod-7:sub" in names
        finally:
            connection.close()
            await client.aclose()

    run(scenario())


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that requires a password, and knows a user `link` with its own."""
    server = RedisServer(tmp_path)
    server.start()
    # Set once it is up: starting with them, it would not answer the start's plain PING.
    assert server.cli("ACL", "SETUSER", "link", "on", ">linkpass", "&*", "+@all") == "OK"
    assert server.cli("CONFIG", "SET", "requirepass", "s3cret") == "OK"
    yield server
    server.kill()


def test_a_password_or_a_user_and_password_from_the_url_authenticate(run: Runner, password_server: RedisServer) -> None:
    port = password_server.port

    async def scenario() -> None:
        for url in (f"redis://:s3cret@127.0.0.1:{port}/0", f"redis://link:linkpass@127.0.0.1:{port}/0"):
            connection, received = await subscribed(endpoint_of(url), "x")
            connection.close()
            assert received.replies == [[b"subscribe", b"x", 1]]

    run(scenario())


def test_a_wrong_or_missing_password_fails_the_open(run: Runner, password_server: RedisServer) -> None:
    port = password_server.port

    async def scenario() -> None:
        with pytest.raises(AuthenticationError):
            await Received().connection(endpoint_of(f"redis://:wrong@127.0.0.1:{port}/0")).open()
        # Without AUTH the server refuses CLIENT SETNAME, the first command.
        with pytest.raises(RedisError, match=r"NOAUTH|Authentication required"):
            await Received().connection(endpoint_of(f"redis://127.0.0.1:{port}/0")).open()

    run(scenario())


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[RedisServer, int, Path]]:
    """A redis-server that also serves TLS, with a certificate for `localhost`; its TLS port and CA file."""
    cert, key = self_signed(tmp_path, "localhost")
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis",
        extra_args=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert),
            "--tls-auth-clients", "no",
        ],
    )  # fmt: skip
    server.start()
    yield server, tls_port, cert
    server.kill()


def test_a_rediss_url_connects_over_verified_tls(run: Runner, tls_server: tuple[RedisServer, int, Path]) -> None:
    server, tls_port, ca = tls_server

    async def scenario() -> None:
        endpoint = endpoint_of(f"rediss://localhost:{tls_port}/0?ssl_ca_certs={ca}")
        assert endpoint.ssl_context is not None
        connection, received = await subscribed(endpoint, "secure")
        try:
            payload = b"p" * (2 * READ_BUFFER_BYTES)  # several TLS records
            await publish(server.url, ("secure", payload))
            await eventually(lambda: received.messages == [(b"secure", payload)], lambda: "no message over TLS")
        finally:
            connection.close()

    run(scenario())


def test_a_unix_socket_url_connects(run: Runner, redis_server: RedisServer) -> None:
    async def scenario() -> None:
        connection, received = await subscribed(endpoint_of(redis_server.unix_url), "local")
        try:
            await publish(redis_server.url, ("local", b"hi"))
            await eventually(lambda: received.messages == [(b"local", b"hi")], lambda: "no message over the socket")
        finally:
            connection.close()

    run(scenario())


def test_an_error_reply_ends_the_connection_with_that_error(run: Runner, redis_server: RedisServer) -> None:
    async def scenario() -> None:
        connection, received = await subscribed(endpoint_of(redis_server.url), "x")
        connection.send(encode_command("GET", "key"))  # refused in subscribed mode
        await asyncio.wait_for(received.lost.wait(), 10)
        assert isinstance(connection.failure, ResponseError)
        with pytest.raises(ResponseError):
            connection.raise_if_lost()

    run(scenario())


def test_a_connection_closed_by_the_server_is_reported_lost(run: Runner, redis_server: RedisServer) -> None:
    async def scenario() -> None:
        connection, received = await subscribed(endpoint_of(redis_server.url, client_name="eva-ws:kill-me:sub"), "x")
        client = Redis.from_url(redis_server.url)
        try:
            await client.execute_command("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "pubsub")
            await asyncio.wait_for(received.lost.wait(), 10)
            assert isinstance(connection.failure, RedisConnectionError)
            with pytest.raises(RedisConnectionError):
                connection.send(encode_command("PING"))
        finally:
            await client.aclose()

    run(scenario())


def test_the_endpoint_takes_the_pods_timeouts_and_keepalive_from_the_client_options() -> None:
    endpoint = endpoint_of("redis://user:pw@redis.example:6380/2", client_name="eva-ws:p:sub")
    assert (endpoint.host, endpoint.port, endpoint.path) == ("redis.example", 6380, None)
    assert (endpoint.username, endpoint.password, endpoint.client_name) == ("user", "pw", "eva-ws:p:sub")
    assert (endpoint.connect_timeout_s, endpoint.command_timeout_s) == (2.0, 2.0)
    assert endpoint.keepalive  # TCP keepalive on, with the pod's idle time
    assert endpoint.ssl_context is None


def test_a_server_certificate_that_does_not_verify_fails_the_open(
    run: Runner, tls_server: tuple[RedisServer, int, Path]
) -> None:
    _, tls_port, _ = tls_server

    async def scenario() -> None:
        # Self-signed and not in the system's CAs: refused, as redis-py's own connections refuse it.
        with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await Received().connection(endpoint_of(f"rediss://localhost:{tls_port}/0")).open()

    run(scenario())


class CommandGate(LocalProxy):
    """Forwards to Redis, holding the client's SUBSCRIBE and UNSUBSCRIBE
    commands (and whatever follows them) until `let_through`, and the server's bytes while
    `hold_replies` is on: a slow network, at the moments a test chooses."""

    def __init__(self, target_port: int, *, gated: tuple[bytes, ...] = (b"SUBSCRIBE", b"UNSUBSCRIBE")) -> None:
        super().__init__(target_port)
        self.gated = gated
        self.held: list[bytes] = []
        self._replies_held = False
        self._replies: list[bytes] = []
        self._upstream: asyncio.StreamWriter | None = None
        self._client: asyncio.StreamWriter | None = None

    def let_through(self, commands: int) -> None:
        assert self._upstream is not None
        for _ in range(commands):
            self._upstream.write(self.held.pop(0))

    def hold_replies(self) -> None:
        self._replies_held = True

    def release_replies(self) -> None:
        assert self._client is not None
        self._replies_held = False
        self._client.write(b"".join(self._replies))
        self._replies.clear()

    def reset_client(self) -> None:
        """End the client's connection with a TCP reset, as a peer or middlebox that lost it does."""
        assert self._client is not None
        self._client.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._client.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, self._upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._client = writer
        for task in (asyncio.create_task(self._commands(reader)), asyncio.create_task(self._answers(upstream_reader))):
            self._tasks.add(task)

    async def _commands(self, reader: asyncio.StreamReader) -> None:
        assert self._upstream is not None
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while header := await reader.readline():
                command = [header]
                for _ in range(int(header[1:])):
                    length = await reader.readline()
                    command += [length, await reader.readexactly(int(length[1:]) + 2)]
                if self.held or command[2][:-2].upper() in self.gated:
                    self.held.append(b"".join(command))
                else:
                    self._upstream.write(b"".join(command))

    async def _answers(self, reader: asyncio.StreamReader) -> None:
        assert self._client is not None
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if self._replies_held:
                    self._replies.append(data)
                else:
                    self._client.write(data)


def gated_link(gate: CommandGate, journal: list[Any]) -> ShardLink:
    """A link through `gate` to channel `x` (as `p:x`), writing what it reports to `journal`."""
    return ShardLink(
        address=("127.0.0.1", gate.port),
        endpoint=endpoint_of(f"redis://127.0.0.1:{gate.port}/0"),
        kind=CLASSIC,
        prefix="p:",
        pod_id="pod",
        on_envelope=lambda envelope: None,
        on_confirmed=lambda link, channel: journal.append(f"confirmed {channel}"),
        on_recovered=lambda channels: journal.append(f"recovered {channels}"),
        on_topology_doubt=lambda: None,
        ping_interval_s=60.0,  # no PING but the first one: the gate holds nothing else
        pong_timeout_s=30.0,
        subscribe_timeout_s=5.0,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        canary_channel="x",  # delivered undecoded: any payload will do
        on_canary=journal.append,
    )


async def subscribers_are(client: Redis, count: int) -> bool:
    return bool((await client.pubsub_numsub("p:x"))[0][1] == count)


def test_a_confirmation_that_a_pending_unsubscribe_undoes_confirms_nothing(
    run: Runner, redis_server: RedisServer
) -> None:
    """Subscribe, unsubscribe and subscribe again, each sent before the first confirmation is read:
    that confirmation is of a subscription the node drops next, so it must not tell a waiting
    client the channel is live (an event published in between would be lost unreported)."""
    journal: list[Any] = []

    async def scenario() -> None:
        async with CommandGate(redis_server.port) as gate:
            link = gated_link(gate, journal)
            client = Redis.from_url(redis_server.url)
            link.start()
            try:
                await eventually(lambda: link.connected, "the link did not connect")
                link.assign("x", notice=False)
                await eventually(lambda: len(gate.held) == 1, "no SUBSCRIBE")
                gate.hold_replies()
                gate.let_through(1)
                await eventually(lambda: subscribers_are(client, 1), "the SUBSCRIBE did not reach Redis")
                link.drop("x")
                await eventually(lambda: len(gate.held) == 1, "no UNSUBSCRIBE")
                link.assign("x", notice=False)
                await eventually(lambda: len(gate.held) == 2, "no second SUBSCRIBE")
                gate.release_replies()  # the link reads the first confirmation
                gate.let_through(1)  # the node drops the channel
                await eventually(lambda: subscribers_are(client, 0), "the UNSUBSCRIBE did not reach Redis")
                assert await client.publish("p:x", b"unseen") == 0
                journal.append("published while unsubscribed")
                gate.let_through(1)
                await eventually(lambda: subscribers_are(client, 1), "the second SUBSCRIBE did not reach Redis")
                await client.publish("p:x", b"seen")
                await eventually(lambda: b"seen" in journal, lambda: f"journal: {journal}")
                assert journal == ["published while unsubscribed", "confirmed x", b"seen"]
            finally:
                await link.close()
                await client.aclose()

    run(scenario())


def test_a_channel_with_an_unsubscribe_on_its_way_is_not_confirmed(run: Runner, redis_server: RedisServer) -> None:
    """Unsubscribed and subscribed again while the UNSUBSCRIBE has not reached the node: until the
    new SUBSCRIBE is confirmed, a client asking for the channel must wait (the node drops it first)."""
    journal: list[Any] = []

    async def scenario() -> None:
        async with CommandGate(redis_server.port) as gate:
            link = gated_link(gate, journal)
            client = Redis.from_url(redis_server.url)
            link.start()
            try:
                await eventually(lambda: link.connected, "the link did not connect")
                link.assign("x", notice=False)
                await eventually(lambda: len(gate.held) == 1, "no SUBSCRIBE")
                gate.let_through(1)
                await eventually(lambda: link.confirmed("x"), "the first SUBSCRIBE was not confirmed")
                link.drop("x")
                await eventually(lambda: len(gate.held) == 1, "no UNSUBSCRIBE")
                link.assign("x", notice=False)
                await eventually(lambda: len(gate.held) == 2, "no second SUBSCRIBE")
                assert not link.confirmed("x")
                gate.let_through(2)
                await eventually(lambda: link.confirmed("x"), "the second SUBSCRIBE was not confirmed")
                assert journal == ["confirmed x", "confirmed x"]
            finally:
                await link.close()
                await client.aclose()

    run(scenario())


def test_a_connection_lost_with_an_error_says_which(run: Runner, redis_server: RedisServer) -> None:
    """The error the kernel gave (a reset, a keepalive timeout) is what an operator reads in
    broker_disconnected, not "closed by server", which it was not."""

    async def scenario() -> None:
        async with CommandGate(redis_server.port, gated=()) as gate:
            connection, received = await subscribed(endpoint_of(f"redis://127.0.0.1:{gate.port}/0"), "x")
            gate.reset_client()
            await asyncio.wait_for(received.lost.wait(), 10)
            assert isinstance(connection.failure, RedisConnectionError)
            assert "reset" in str(connection.failure).lower(), str(connection.failure)
            assert f"127.0.0.1:{gate.port}" in str(connection.failure)

    run(scenario())
