"""What a load-generator client says to each kind of server to authenticate and subscribe.

Events are recognised by the payload's ``"seq":N,"ts":T`` mark wherever the server wraps it,
so only control frames (handshake, acks, pings) come through a dialect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import quote

DialectName = Literal["eva-ws", "raw", "socketio"]


@dataclass(frozen=True, slots=True)
class Reply:
    """A dialect's reaction to one control frame."""

    send: bytes | None = None
    subscribed: bool = False
    # Set when the server refused: the connection counts as failed.
    error: str | None = None


class Dialect:
    """eva-ws protocol: token in the query, JSON subscribe, a `subscribed` acknowledgement."""

    name: DialectName = "eva-ws"
    path: str = "/ws/transactions"

    def url(self, base: str, token: str, customer: str) -> str:
        return f"{base}{self.path}?token={quote(token)}&customerId={quote(customer)}"

    def on_open(self, token: str, customer: str) -> bytes | None:
        """First frame to send once the WebSocket is open (None: wait for the server)."""
        return json.dumps(
            {"type": "subscribe", "channel": "transactions", "filters": {"customerId": customer}},
            separators=(",", ":"),
        ).encode()

    def on_control(self, frame: bytes, token: str, customer: str) -> Reply:
        if b'"type":"subscribed"' in frame:
            return Reply(subscribed=True)
        if b'"type":"error"' in frame:
            return Reply(error=frame[:200].decode(errors="replace"))
        return Reply()


class RawDialect(Dialect):
    """The raw aiohttp reference speaks the eva-ws subscribe message on its own path."""

    name: DialectName = "raw"
    path: str = "/ws"


class SocketIODialect(Dialect):
    """Socket.IO v5 over Engine.IO v4, websocket transport, auth in the CONNECT packet.

    Frames: ``0{..}`` engine open, ``40{..}`` namespace connected, ``44{..}`` refused,
    ``42[event,data]`` event, ``43<id>[data]`` ack, ``2``/``3`` engine ping/pong.
    """

    name: DialectName = "socketio"
    path: str = "/socket.io/"

    def url(self, base: str, token: str, customer: str) -> str:
        return f"{base}{self.path}?EIO=4&transport=websocket&customerId={quote(customer)}"

    def on_open(self, token: str, customer: str) -> bytes | None:
        return None

    def on_control(self, frame: bytes, token: str, customer: str) -> Reply:
        if frame == b"2":
            return Reply(send=b"3")
        if frame.startswith(b"0{"):
            return Reply(send=b"40" + json.dumps({"token": token}, separators=(",", ":")).encode())
        if frame.startswith(b"40"):
            subscribe = json.dumps(["subscribe", {"customerId": customer}], separators=(",", ":"))
            return Reply(send=b"421" + subscribe.encode())
        if frame.startswith(b"431"):
            if b'"subscribed"' in frame:
                return Reply(subscribed=True)
            return Reply(error=frame[:200].decode(errors="replace"))
        if frame.startswith(b"44"):
            return Reply(error=frame[:200].decode(errors="replace"))
        return Reply()


DIALECTS: Final[dict[DialectName, Dialect]] = {
    "eva-ws": Dialect(),
    "raw": RawDialect(),
    "socketio": SocketIODialect(),
}
