"""The pod's control plane: sends admin commands to every pod and applies those that arrive to its own sessions.

Commands travel on a reserved broker channel (service/control_commands.py). This pod
receives them as any pod does, its own included, so a command takes effect everywhere the
same way. Revocations are also kept in the revocation store; the pod loads them at start
and again after the broker regained its subscriptions (a command may have been missed),
into the `RevokedTokens` its token verifier checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from service import control_commands, metrics
from service.backend_errors import BackendUnavailable
from service.broker.base import Broker
from service.control_commands import CONTROL_CHANNEL, Command, Disconnect, Issued, Revoke, Unsubscribe
from service.log import get_logger
from service.protocol import CloseCode
from service.revocations import RevocationStore, RevokedTokens

if TYPE_CHECKING:
    from service.hub import Hub
    from service.session import Session

log = get_logger("eva_ws.control")

# Retry pace of the start-up work (subscribe, load revocations) while the broker is down.
_RETRY_MIN_S: Final = 0.1
_RETRY_MAX_S: Final = 5.0
# How long the pod's start waits for the revocations before it opens its port anyway
# (milliseconds with Redis up; a Redis that is down must not hold the start for long).
_START_WAIT_S: Final = 2.0

Attempt = Callable[[], Awaitable[None]]


class ControlPlane:
    """Applies control commands to this pod's sessions; see the module docstring."""

    def __init__(self, broker: Broker, hub: Hub, *, store: RevocationStore, revoked: RevokedTokens) -> None:
        self._broker = broker
        self._hub = hub
        self.store = store
        self.revoked = revoked
        # The sessions of this pod; control commands are rare, so they are searched, not indexed.
        self._sessions: set[Session] = set()
        self._ready = asyncio.Event()
        self._starting: asyncio.Task[None] | None = None
        self._reload: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        """True once the pod listens for commands and has loaded the revocations."""
        return self._ready.is_set()

    def attach(self, session: Session) -> None:
        self._sessions.add(session)

    def detach(self, session: Session) -> None:
        self._sessions.discard(session)

    async def start(self, *, wait_s: float = _START_WAIT_S) -> None:
        """Listen for commands and load the revocations; return once done, or after `wait_s`.

        A broker that cannot be reached does not fail the start: the work goes on in the
        background. Until then the pod cannot tell revoked tokens (sockets work without Redis,
        as everything else does); once loaded, the sockets of revoked tokens are closed.
        """
        self._starting = asyncio.create_task(self._start(), name="control-start")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._starting), wait_s)

    async def close(self) -> None:
        for task in (self._starting, self._reload, *self._tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.store.close()

    async def send(self, command: Command, *, requested_by: str) -> Issued:
        """Send a command to every pod (see control_commands.send)."""
        return await control_commands.send(self._broker, self.store, command, requested_by=requested_by)

    # -- control channel ------------------------------------------------------------

    def _on_command(self, payload: bytes) -> None:
        try:
            issued = control_commands.decode(payload)
        except ValueError as error:
            log.warning("control_command_invalid", error=str(error))
            return
        self.apply(issued)

    def _on_regained(self) -> None:
        if self._reload is None or self._reload.done():
            # A revocation published while the subscription was lost is in the store.
            self._reload = asyncio.create_task(self._load_revocations(), name="control-reload")

    # -- applying commands -----------------------------------------------------------

    def apply(self, issued: Issued) -> None:
        """Apply one command to this pod's sessions (an unsubscribe finishes in a task of its own)."""
        command = issued.command
        if isinstance(command, Revoke):
            self.revoked.prune()
            self.revoked.add(command.revocation)
            self._record(issued, self._close_revoked())
        elif isinstance(command, Disconnect):
            sessions = [s for s in self._sessions if s.connection.principal.user_id == command.user_id]
            self._record(issued, self._close(sessions, command.reason))
        else:
            task = asyncio.create_task(self._unsubscribe(issued, command))
            # Referenced until done, so it cannot be garbage-collected half-way.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _record(issued: Issued, affected: int) -> None:
        name = control_commands.command_name(issued.command)
        metrics.CONTROL_COMMANDS_APPLIED.labels(name).inc()
        metrics.CONTROL_SOCKETS_AFFECTED.labels(name).inc(affected)
        log.info(
            "control_command_applied",
            command=name,
            requested_by=issued.requested_by,
            target=control_commands.target(issued.command),
            sockets=affected,
        )

    def _close_revoked(self) -> int:
        revoked = [s for s in self._sessions if self.revoked.revokes(s.connection.principal)]
        return self._close(revoked, "token revoked")

    @staticmethod
    def _close(sessions: list[Session], reason: str) -> int:
        closed = 0
        for session in sessions:
            conn = session.connection
            if not conn.closing:
                conn.close_soon(CloseCode.DISCONNECTED_BY_SERVER, reason)
                closed += 1
        return closed

    async def _unsubscribe(self, issued: Issued, command: Unsubscribe) -> None:
        ended = 0
        for session in [s for s in self._sessions if s.connection.principal.user_id == command.user_id]:
            if not session.connection.closing:
                ended += await session.end_subscriptions(command.channel, command.filters, reason=command.reason)
        self._record(issued, ended)

    # -- start-up --------------------------------------------------------------------

    async def _start(self) -> None:
        await self._retrying(
            "control_subscribe",
            lambda: self._hub.listen(CONTROL_CHANNEL, self._on_command, on_regained=self._on_regained),
        )
        await self._load_revocations()
        self._ready.set()
        log.info("control_plane_ready", revocations=len(self.revoked))

    async def _load_revocations(self) -> None:
        async def load() -> None:
            for revocation in await self.store.load():
                self.revoked.add(revocation)
            self.revoked.prune()

        await self._retrying("revocations_load", load)
        # Sockets admitted before the load (or while a command was missed) may be revoked.
        closed = self._close_revoked()
        if closed:
            log.info("revoked_sockets_closed", sockets=closed)

    @staticmethod
    async def _retrying(what: str, attempt: Attempt) -> None:
        delay_s = _RETRY_MIN_S
        while True:
            try:
                await attempt()
                return
            except BackendUnavailable as error:
                log.warning("control_start_retry", operation=what, error=str(error))
            await asyncio.sleep(random.uniform(0, delay_s))
            delay_s = min(_RETRY_MAX_S, delay_s * 2)
