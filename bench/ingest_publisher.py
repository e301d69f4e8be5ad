"""The ingest scenario's publisher: pre-encoded messages in pipelined plain PUBLISH, so Redis is not the limit.

eva-ws's own publishers run the publish script per event (offset, history, idempotency: tens of
µs of Redis CPU each), which caps what one Redis on a shared core can offer a pod far below what
the pod can take. Here, for eva-ws, each message is the exact envelope the script would PUBLISH
(docs/redis-wire-format.md: `e1:<offset>:<epoch>\\n<payload>`, the payload as
service.publisher.prepare_event encodes a transaction update), with consecutive offsets from the
position the pod read when its subscriber joined, so the pod sees no gap and reads no history:
its work per event is what it is with the script. For the raw reference the message is the bare
payload, as its own sink sends it. Commands are hand-packed RESP written on one connection per
process, replies counted, not parsed: a few µs of Redis CPU per event.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast
from urllib.parse import urlsplit

from bench.pacing import open_loop
from bench.payload import PAYLOAD_BYTES

Wire = Literal["envelope", "bare"]
# Which wire each publisher sink kind gets in the ingest scenario (see bench.publisher.make_sink);
# other kinds keep their own publish path.
WIRE_OF_SINK: Final[dict[str, Wire]] = {"eva-ws": "envelope", "raw": "bare"}
# Events built and written per loop turn at most, so the pacing stays fine-grained.
CHUNK_MAX: Final = 1024
# Commands written but not yet answered at most: Redis's query buffer, not this process, absorbs a burst.
IN_FLIGHT_MAX: Final = 16_384
_CRLF: Final = b"\r\n"
# The event object around the benchmark data, key for key as service.publisher.prepare_event encodes it.
_EVENT_HEAD: Final = b'{"type":"transaction_update","data":'
_EVENT_TAIL: Final = b',"timestamp":"%b","correlationId":"%b'


def channel_of(customer: str) -> str:
    return f"transactions:{customer}"


@dataclass(slots=True)
class _Channel:
    """What every message of one channel shares, and where the channel's sequence stands."""

    command_head: bytes  # `*3 PUBLISH <channel>` in RESP, up to the message's length
    payload_middle: bytes  # the payload between the sequence number in `id` and the padding
    envelope_head: bytes  # `e1:` for eva-ws, empty for a bare payload
    epoch: bytes  # `:<epoch>\n` for eva-ws, empty for a bare payload
    base_offset: int  # offset of the channel before this publisher's first event
    payload_room: int  # payload bytes left for the two sequence numbers, the timestamp and the padding
    seq: int = 0


def _payload_middle(customer: str) -> tuple[bytes, int]:
    """The constant middle of bench.payload.event_payload's bytes, and the room it leaves."""
    middle = (
        '","status":"pending","stage":"review","updatedAt":"2026-01-01T00:00:00Z",'
        f'"updatedBy":"bench","changedFields":["status"],"customerId":"{customer}","pad":"'
    ).encode()
    fixed = len(b'{"id":"tx-') + len(middle) + len(b'","seq":') + len(b',"ts":') + len(b"}")
    return middle, PAYLOAD_BYTES - fixed


class _ReplyCounter(asyncio.Protocol):
    """Counts Redis's one-line replies (PUBLISH answers an integer) and keeps the first errors."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answered = 0
        self.errors: list[str] = []
        self.lost: BaseException | None = None
        self.progress = asyncio.Event()
        self._last_byte = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        # A reply's CRLF may be split over two reads.
        self.answered += data.count(_CRLF) + (self._last_byte == b"\r" and data[:1] == b"\n")
        self._last_byte = data[-1:]
        if b"-" in data and len(self.errors) < 3:
            self.errors += [line.decode(errors="replace") for line in data.split(_CRLF) if line.startswith(b"-")][:3]
        self.progress.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("Redis closed the connection")
        self.progress.set()


class IngestPublisher:
    """Paced publishing of pre-encoded events on `transactions:<customer>`, like bench.publisher.Publisher."""

    def __init__(self, redis_url: str, wire: str) -> None:
        if wire not in WIRE_OF_SINK.values():
            raise ValueError(f"unknown wire {wire!r}")
        self._redis_url = redis_url
        self._envelopes = wire == "envelope"
        self._channels: dict[str, _Channel] = {}
        self._pads: dict[int, bytes] = {}
        self._replies: _ReplyCounter | None = None
        self._written = 0
        # Correlation ids: a random uuid-shaped prefix per publisher, then the event's number in hex.
        self._correlation_prefix = b"%b-%b-4%b-8%b-" % (
            secrets.token_hex(4).encode(),
            secrets.token_hex(2).encode(),
            secrets.token_hex(2)[1:].encode(),
            secrets.token_hex(2)[1:].encode(),
        )
        self._events = 0

    async def start(self) -> None:
        url = urlsplit(self._redis_url)
        loop = asyncio.get_running_loop()
        _, self._replies = await loop.create_connection(_ReplyCounter, url.hostname or "127.0.0.1", url.port or 6379)
        if url.password:
            auth = [url.username.encode()] if url.username else []
            self._write(_command(b"AUTH", *auth, url.password.encode()), 1)
            await self._wait_answered(0)

    async def close(self) -> None:
        if self._replies is not None and self._replies.transport is not None:
            self._replies.transport.close()

    def restart_sequences(self) -> None:
        """Forget every channel's sequence and position: the next run reads the positions again."""
        self._channels = {}

    async def run(self, customers: Sequence[str], rate: float, duration_s: float) -> dict[str, Any]:
        """Publish `rate` events/s round-robin over `customers` for `duration_s` (open loop)."""
        await self._know(customers)
        channels = [self._channels[c] for c in customers]

        async def publish(first: int, count: int) -> None:
            self._write(self._encode(channels, first, count), count)
            await self._wait_answered(IN_FLIGHT_MAX)

        paced = await open_loop(rate, duration_s, CHUNK_MAX, publish)
        # Every command answered: Redis has sent each message on before the caller counts deliveries.
        await self._wait_answered(0)
        elapsed_s = time.perf_counter() - paced.started
        assert self._replies is not None
        return {
            "sent": paced.sent,
            "elapsed_s": elapsed_s,
            "behind_max_s": paced.behind_max_s,
            "published": {c: self._channels[c].seq for c in customers},
            "errors": self._replies.errors,
        }

    def _encode(self, channels: Sequence[_Channel], first: int, count: int) -> bytes:
        """`count` PUBLISH commands, round-robin from event `first`, with one publish timestamp."""
        ts_ns = time.time_ns()
        ts = ts_ns // 1000
        ts_digits = len(str(ts))
        tail_head = _EVENT_TAIL % (_iso_ms(ts_ns), self._correlation_prefix)
        event_tail = b""
        pads = self._pads
        parts = []
        n = len(channels)
        for i in range(first, first + count):
            ch = channels[i % n]
            seq = ch.seq = ch.seq + 1
            seq_text = b"%d" % seq
            pad_len = ch.payload_room - 2 * len(seq_text) - ts_digits
            pad = pads.get(pad_len) or pads.setdefault(pad_len, b"x" * pad_len)
            if ch.epoch:
                header = b"%b%d%b%b" % (ch.envelope_head, ch.base_offset + seq, ch.epoch, _EVENT_HEAD)
                self._events += 1
                # A fresh correlation id per event, as long as prepare_event's uuid4 text.
                event_tail = b'%b%012x"}' % (tail_head, self._events)
            else:
                header = b""
            parts.append(
                b'%b%d\r\n%b{"id":"tx-%b%b%b","seq":%b,"ts":%d}%b\r\n'
                % (
                    ch.command_head,
                    len(header) + PAYLOAD_BYTES + len(event_tail),
                    header,
                    seq_text,
                    ch.payload_middle,
                    pad,
                    seq_text,
                    ts,
                    event_tail,
                )
            )
        return b"".join(parts)

    async def _know(self, customers: Sequence[str]) -> None:
        """Each new channel's position: where the pod that subscribed it expects the next offset."""
        new = [c for c in customers if c not in self._channels]
        if not new:
            return
        positions: list[tuple[bytes, int]] = [(b"", 0)] * len(new)
        if self._envelopes:
            positions = await self._positions(new)
        for customer, (epoch, offset) in zip(new, positions, strict=True):
            name = channel_of(customer).encode()
            middle, room = _payload_middle(customer)
            self._channels[customer] = _Channel(
                command_head=b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$" % (len(name), name),
                payload_middle=middle,
                envelope_head=b"e1:" if epoch else b"",
                epoch=b":%b\n" % epoch if epoch else b"",
                base_offset=offset,
                payload_room=room,
            )

    async def _positions(self, customers: Sequence[str]) -> list[tuple[bytes, int]]:
        """(epoch, offset) of each channel's meta hash, as the pod's history read left it.

        A subscribed channel has one: the pod's subscribe read its position through the history
        script, which creates it. Nobody reads a channel without one on this run, so it gets a
        fresh epoch and starts at offset 1, as the publish script would start it.
        """
        import redis.asyncio as aioredis

        from service import redis_keys
        from service.broker.redis_wire import new_epoch

        client = aioredis.from_url(self._redis_url)
        try:
            pipe = client.pipeline(transaction=False)
            for customer in customers:
                pipe.hmget(redis_keys.meta_key("", channel_of(customer)), "epoch", "offset")
            replies = await pipe.execute()
        finally:
            await client.aclose()
        return [
            (epoch, int(offset)) if epoch is not None and offset is not None else (new_epoch().encode(), 0)
            for epoch, offset in replies
        ]

    def _write(self, data: bytes, commands: int) -> None:
        assert self._replies is not None
        assert self._replies.transport is not None
        if self._replies.lost is not None:
            raise self._replies.lost
        self._replies.transport.write(data)
        self._written += commands

    async def _wait_answered(self, in_flight_max: int) -> None:
        replies = self._replies
        assert replies is not None
        while self._written - replies.answered > in_flight_max:
            if replies.lost is not None:
                raise replies.lost
            replies.progress.clear()
            await replies.progress.wait()


def _iso_ms(ts_ns: int) -> bytes:
    """`2026-01-01T00:00:00.000Z`, as service.publisher stamps an event."""
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{nanos // 1_000_000:03d}Z".encode()


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)
