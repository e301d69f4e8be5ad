"""The protocol of one connection: dispatch, authorization, rate limit and token expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from service import messages, metrics
from service.auth import AuthError, Principal, TokenVerifier, authorize_subscription, entitled_to_key
from service.config import Settings
from service.connection import Connection
from service.deadlines import Deadlines, Slot
from service.hub import Hub, HubUnavailable, SubscribeResult, Subscription
from service.log import get_logger
from service.protocol import (
    Channel,
    ClientMessage,
    CloseCode,
    ErrorCode,
    Filters,
    ProtocolError,
    channel_of_key,
    iso_utc,
    parse_client_message,
)
from service.ratelimit import REPLAYED_EVENTS_PER_MESSAGE, TokenBucket
from service.resume_budget import ResumeBudgets, ResumeRefused

log = get_logger("eva_ws.session")


class Session:
    """Handles the client messages of one connection, one at a time, in arrival order."""

    # One per connection: no instance dict.
    __slots__ = (
        "_bucket",
        "_conn",
        "_counted_reconnect",
        "_deadlines",
        "_expiry_warned",
        "_hub",
        "_resume_budgets",
        "_settings",
        "_subscriptions",
        "_verifier",
        "_violations",
        "deadline_slot",
    )

    def __init__(
        self,
        conn: Connection,
        *,
        hub: Hub,
        verifier: TokenVerifier,
        settings: Settings,
        deadlines: Deadlines,
        resume_budgets: ResumeBudgets,
        reconnecting: bool,
    ) -> None:
        self._conn = conn
        self._hub = hub
        self._resume_budgets = resume_budgets
        self._verifier = verifier
        self._settings = settings
        self._bucket = TokenBucket(burst=settings.rate_limit_burst)
        self._violations = 0
        # Usually one or two, and at most max_subscriptions: a tuple costs 48 bytes where the
        # smallest dict costs 184, and a short linear search is as fast as hashing.
        self._subscriptions: tuple[Subscription, ...] = ()
        self._deadlines = deadlines
        self.deadline_slot: Slot | None = None
        # Whether the client was told that its token expired and the grace period runs.
        self._expiry_warned = False
        self._counted_reconnect = reconnecting
        if reconnecting:
            metrics.RECONNECTS.inc()
        self._schedule_expiry(conn.principal)

    @property
    def connection(self) -> Connection:
        return self._conn

    @property
    def subscription_keys(self) -> frozenset[str]:
        return frozenset(sub.key for sub in self._subscriptions)

    async def on_text(self, text: str) -> None:
        if not self._admit(text):
            return
        try:
            message = parse_client_message(text)
        except ProtocolError as error:
            metrics.MESSAGES_RECEIVED.labels("invalid").inc()
            self._reply_error(error)
            return
        metrics.MESSAGES_RECEIVED.labels(message.type).inc()
        try:
            if message.type == "ping":
                self._conn.send(messages.pong(message.correlation_id), "pong")
            elif message.type == "subscribe":
                await self._subscribe(message)
            elif message.type == "unsubscribe":
                await self._unsubscribe(message)
            else:
                await self._refresh(message)
        except ProtocolError as error:
            self._reply_error(error)

    async def on_ping(self, payload: bytes) -> None:
        """A WebSocket PING control frame: rate-limited like any message, then answered.

        The pong is written from the read loop, so a client that pings without reading
        its pongs stalls its own reads (TCP backpressure) instead of growing a backlog.
        """
        if not self._admit():
            return
        metrics.MESSAGES_RECEIVED.labels("ws_ping").inc()
        try:
            await self._conn.ws.pong(payload)
        except ConnectionError:
            return  # the read loop sees the close next

    def on_binary(self) -> None:
        if not self._admit():
            return
        metrics.MESSAGES_RECEIVED.labels("binary").inc()
        self._reply_error(ProtocolError(ErrorCode.BINARY_NOT_SUPPORTED, "send JSON in text frames"))

    async def close(self) -> None:
        self._deadlines.cancel(self)
        subscriptions, self._subscriptions = self._subscriptions, ()
        for sub in subscriptions:
            await self._hub.unsubscribe(sub)

    # -- message handlers ------------------------------------------------------------

    async def _subscribe(self, message: ClientMessage) -> None:
        key, filters = authorize_subscription(self._conn.principal, message)
        cid = message.correlation_id
        if self._find(key) is not None:
            raise ProtocolError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {key!r}", cid)
        if len(self._subscriptions) >= self._settings.max_subscriptions:
            raise ProtocolError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {self._settings.max_subscriptions} subscriptions per connection",
                cid,
            )
        if message.since is not None and not self._counted_reconnect:
            self._counted_reconnect = True
            metrics.RECONNECTS.inc()

        charge_user: Callable[[int], None] | None = None

        def acknowledge(sub: Subscription, result: SubscribeResult) -> None:
            self._subscriptions += (sub,)
            ack = messages.subscribed(
                key,
                filters,
                result.position,
                cid,
                presence=message.presence,
                snapshot=message.snapshot,
                recovered=result.recovered,
                replayed=result.replayed,
            )
            if result.read:
                # The events read for a resume and the transactions of a snapshot count against
                # the rate limit, filtered out or not, and against the user's resume budget.
                self._bucket.charge(result.read / REPLAYED_EVENTS_PER_MESSAGE)
                if charge_user is not None:
                    charge_user(result.read)
            self._conn.send(ack, "subscribed")
            for snapshot_message in result.snapshot or ():
                self._conn.send(snapshot_message, "snapshot")

        async def join() -> None:
            await self._hub.subscribe(
                self._conn,
                key,
                filters,
                since=message.since,
                on_ready=acknowledge,
                presence=message.presence,
                snapshot=message.snapshot,
            )

        try:
            if message.since is None and not message.snapshot:
                await join()  # reads no history
                return
            try:
                async with self._resume_budgets.read(self._conn.principal.user_id) as charge_user:
                    await join()
            except ResumeRefused as refused:
                # Not logged: an attacker's sockets would write a line per refusal. Counted in
                # eva_ws_errors_total{code="rate_limited"} and eva_ws_resumes_total{outcome="refused"};
                # not a violation, so never a close.
                metrics.RESUMES.labels("refused").inc()
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    f"this user's resumes read too much history on this pod; retry in {refused.retry_after_s:.1f} s",
                    cid,
                ) from None
        except HubUnavailable:
            log.warning(
                "subscribe_unavailable", conn_id=self._conn.conn_id, user_id=self._conn.principal.user_id, channel=key
            )
            raise ProtocolError(ErrorCode.UNAVAILABLE, "subscriptions are unavailable right now; retry", cid) from None

    async def _unsubscribe(self, message: ClientMessage) -> None:
        key, filters = authorize_subscription(self._conn.principal, message)
        sub = self._find(key)
        if sub is None:
            raise ProtocolError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {key!r}", message.correlation_id)
        self._forget(sub)
        await self._hub.unsubscribe(sub)
        self._conn.send(messages.unsubscribed(key, filters, message.correlation_id), "unsubscribed")

    async def _refresh(self, message: ClientMessage) -> None:
        assert message.token is not None
        cid = message.correlation_id
        try:
            principal = await self._verifier.verify(message.token)
        except AuthError as error:
            code = ErrorCode.TOKEN_REVOKED if error.reason == "revoked" else ErrorCode.INVALID_TOKEN
            raise ProtocolError(code, error.message, cid) from None
        if principal.user_id != self._conn.principal.user_id:
            raise ProtocolError(ErrorCode.INVALID_TOKEN, "the new token is for another user", cid)
        self._conn.principal = principal
        # Subscriptions were authorized with the old token; drop those the new one no longer allows.
        for sub in [s for s in self._subscriptions if not entitled_to_key(principal, s.key)]:
            # Ended by the server, not asked for: the new token does not allow it.
            await self._end(sub, "forbidden", cid)
        self._schedule_expiry(principal)
        self._conn.send(messages.refreshed(iso_utc(principal.expires_at), cid), "refreshed")

    async def end_subscriptions(self, channel: Channel, filters: Filters, *, reason: str) -> int:
        """End (POST /api/v1/unsubscribe) the subscriptions on `channel` whose filters include every
        one of `filters`; the client gets `unsubscribed` with `reason`. How many ended."""
        wanted = filters.to_json().items()
        ended = [
            sub
            for sub in self._subscriptions
            if channel_of_key(sub.key) is channel and wanted <= sub.filters.to_json().items()
        ]
        for sub in ended:
            await self._end(sub, reason, None)
        return len(ended)

    async def _end(self, sub: Subscription, reason: str, correlation_id: str | None) -> None:
        """End a subscription the server decided to end, and tell the client why."""
        key = sub.key
        self._forget(sub)
        await self._hub.unsubscribe(sub)
        self._conn.send(messages.unsubscribed(key, sub.filters, correlation_id, reason=reason), "unsubscribed")

    def _find(self, key: str) -> Subscription | None:
        for sub in self._subscriptions:
            if sub.key == key:
                return sub
        return None

    def _forget(self, sub: Subscription) -> None:
        self._subscriptions = tuple(s for s in self._subscriptions if s is not sub)

    # -- limits and timers -----------------------------------------------------------

    def _admit(self, text: str | None = None) -> bool:
        if self._conn.closing:
            # What a client sends once its close is decided goes unanswered and unlogged: a
            # flood read in one go after the limit would otherwise log a line per message.
            return False
        if self._bucket.allow(rate_per_s=self._settings.rate_limit_per_s, burst=self._settings.rate_limit_burst):
            return True
        self._violations += 1
        if self._violations >= self._settings.rate_limit_max_violations:
            log.warning("rate_limit_close", conn_id=self._conn.conn_id, user_id=self._conn.principal.user_id)
            self._conn.close_soon(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
        else:
            # With the refused message's correlationId, so a client knows which subscribe to
            # retry. Parsed only when refused, which happens rate_limit_max_violations times at most.
            cid = None if text is None else _correlation_id(text)
            self._reply_error(ProtocolError(ErrorCode.RATE_LIMITED, "too many messages; slow down", cid))
        return False

    def _reply_error(self, error: ProtocolError) -> None:
        metrics.ERRORS.labels(error.code.value).inc()
        self._conn.send(messages.error(error), "error")

    def _schedule_expiry(self, principal: Principal) -> None:
        self._expiry_warned = False
        delay_s = max(0.0, principal.expires_at - time.time())
        self._deadlines.schedule(self, asyncio.get_running_loop().time() + delay_s)

    def on_deadline(self) -> None:
        """The token expired: ask for a refresh, then close once the grace period is over."""
        if self._expiry_warned:
            log.info("token_expired_close", conn_id=self._conn.conn_id, user_id=self._conn.principal.user_id)
            self._conn.close_soon(CloseCode.TOKEN_EXPIRED, "token expired")
            return
        grace_s = self._settings.token_refresh_grace_s
        self._reply_error(
            ProtocolError(
                ErrorCode.TOKEN_EXPIRING,
                f'token expired; send {{"type": "refresh", "token": ...}} within {grace_s} s',
            )
        )
        self._expiry_warned = True
        self._deadlines.schedule(self, asyncio.get_running_loop().time() + grace_s)


def _correlation_id(text: str) -> str | None:
    try:
        return parse_client_message(text).correlation_id
    except ProtocolError as error:
        return error.correlation_id
