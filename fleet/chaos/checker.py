"""The delivery checker: every accepted event reaches every subscriber once and in order, or the subscriber is told.

It reads two logs and nothing else. The publishers' ledger says, for every event, which publish
attempts were made and how each ended (a 2xx with its offset and epoch, an ambiguous failure that
may have stored it, a refusal that did not). Each client's log is what arrived on its socket, in
order: subscribe acknowledgements, `resync` notices and events. The rules, per client and
subscription:

- From the position a subscription starts at, every event accepted with 2xx in that epoch is
  delivered, once, in offset order. A `transaction_update` may be skipped only when a later
  update of the same transaction was delivered instead (conflation, docs/protocol.md).
- A `resync` (or an acknowledgement with `recovered: false`) moves the position: what the old
  position missed is "told", not lost. The events of the new position's epoch that the history
  still held (the last `history_size` offsets up to the position) are not told: skipping them
  is a loss, because the server could have replayed them.
- An event of another epoch without a notice first is a violation: the client was not told.
- The same event (one publisher id) at two offsets is a duplicate. If one of its publish
  attempts was ambiguous (timeout, 5xx, reset) and the server has no idempotency keys, the
  publisher could not have avoided it: it is counted as "ambiguous", not as a violation.
- At the end, each client's last state of every transaction equals the last state accepted.

`check_outbox` judges a run whose events were written into the PostgreSQL outbox instead
(docs/outbox.md). A commit returns no offset, so each event is known by its correlationId and
the writers' record of how its transaction ended: committed (with its place in the order the
channel's commits returned), rolled back (or failed before the commit), or unknown (the commit
itself failed). A committed event is placed where clients received it and judged by the rules
above; besides, rolled-back events are never delivered, unknown ones at most once, each client
gets a channel's committed events in commit order, and the outbox is empty at the end.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

CONFLATABLE: Final = "transaction_update"


class Outcome(StrEnum):
    """How one publish attempt ended."""

    ACCEPTED = "accepted"  # 2xx: stored at the offset and epoch of the answer
    AMBIGUOUS = "ambiguous"  # timeout, 5xx or a reset after sending: it may have been stored
    REFUSED = "refused"  # 4xx or no connection: it was not stored


@dataclass(frozen=True)
class Attempt:
    outcome: Outcome
    at_s: float  # wall clock when the attempt ended
    offset: int | None = None
    epoch: str | None = None


@dataclass
class PublishedEvent:
    """One event as its publisher saw it; `event_id` is its correlationId (and idempotency key)."""

    event_id: str
    subscription: str
    transaction_id: str
    event_type: str
    data: dict[str, Any]
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def accepted(self) -> Attempt | None:
        return next((a for a in self.attempts if a.outcome is Outcome.ACCEPTED), None)

    @property
    def position(self) -> tuple[str, int] | None:
        """(epoch, offset) where the accepted attempt stored it."""
        accepted = self.accepted
        if accepted is None or accepted.epoch is None or accepted.offset is None:
            return None
        return accepted.epoch, accepted.offset

    @property
    def ambiguous(self) -> bool:
        return any(a.outcome is Outcome.AMBIGUOUS for a in self.attempts)


class Kind(StrEnum):
    SUBSCRIBED = "subscribed"
    RESYNC = "resync"
    EVENT = "event"


@dataclass(frozen=True)
class Record:
    """One message a client received, in arrival order; `at_s` is the wall clock at arrival."""

    kind: Kind
    subscription: str
    offset: int
    epoch: str
    at_s: float
    recovered: bool | None = None  # subscribed: absent on a first subscribe
    event_id: str | None = None  # event: its correlationId
    event_type: str | None = None
    data: dict[str, Any] | None = None


@dataclass
class ClientLog:
    name: str
    kind: str  # "python" or "node"
    records: list[Record] = field(default_factory=list)


class Violation(StrEnum):
    LOST = "lost"  # accepted, in the subscriber's window, never delivered nor told
    SKIPPED_HELD = "resync_skipped_history"  # a notice placed its position after events its history held
    DUPLICATED = "duplicated"  # one event delivered twice (same offset, or same id at two offsets)
    OUT_OF_ORDER = "out_of_order"
    UNTOLD_EPOCH = "epoch_changed_without_resync"
    FINAL_STATE = "final_state"
    ROLLED_BACK_DELIVERED = "rolled_back_delivered"  # an outbox event whose transaction did not commit
    COMMIT_ORDER = "out_of_commit_order"  # a channel's outbox events not in the order their commits returned
    OUTBOX_NOT_EMPTY = "outbox_not_empty"  # rows left in eva_ws_outbox after the run settled


class CommitOutcome(StrEnum):
    """How an outbox writer's transaction ended."""

    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"  # rolled back on purpose, or failed before its commit was sent
    UNKNOWN = "unknown"  # the commit itself failed: it may or may not have committed


@dataclass
class OutboxWrite:
    """One event an outbox writer inserted with `enqueue`; `event_id` is its correlationId."""

    event_id: str
    subscription: str
    transaction_id: str
    event_type: str
    data: dict[str, Any]
    outcome: CommitOutcome
    at_s: float  # wall clock when the commit (or rollback) returned
    commit_index: int | None = None  # committed: its place among its channel's commits, in the order they returned


@dataclass
class OutboxCounts:
    committed: int = 0
    rolled_back: int = 0
    unknown: int = 0
    unknown_delivered: int = 0  # unknown outcome, yet delivered: it did commit
    rows_left: int = 0


@dataclass
class Report:
    events: int = 0  # events accepted with 2xx
    ambiguous_publishes: int = 0  # events with at least one ambiguous attempt
    deliveries: int = 0
    lost: int = 0
    duplicated: int = 0
    ambiguous_duplicates: int = 0  # duplicates of ambiguous publishes, without idempotency keys
    out_of_order: int = 0
    told: int = 0  # events a subscriber missed after being told (resync)
    conflated: int = 0
    resyncs: int = 0
    final_state_mismatches: int = 0
    worst_delay_s: float = 0.0  # longest wait from a 2xx (an outbox commit) to a delivery
    outbox: OutboxCounts | None = None  # set by check_outbox
    violations: list[tuple[Violation, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, kind: Violation, detail: str) -> None:
        self.violations.append((kind, detail))

    def counts(self) -> dict[Violation, int]:
        counts: dict[Violation, int] = defaultdict(int)
        for kind, _ in self.violations:
            counts[kind] += 1
        return dict(counts)


@dataclass
class _Window:
    """Offsets (start, end] of one epoch a subscriber was owed; end None means "to the end of the run"."""

    epoch: str
    start: int
    end: int | None = None


@dataclass
class _Stream:
    """The walk over one client's records for one subscription."""

    windows: list[_Window] = field(default_factory=list)
    cursor: tuple[str, int] | None = None  # epoch and offset of the last event handled, or of the last notice
    delivered: dict[tuple[str, int], Record] = field(default_factory=dict)
    last_by_transaction: dict[str, Record] = field(default_factory=dict)
    # (epoch, after, up_to, when): offsets a notice told the subscriber it would not get; None: the rest of that epoch.
    told: list[tuple[str, int, int | None, float]] = field(default_factory=list)
    # (first seen, first seen) of the epochs a notice moved between: every epoch in between was told too.
    told_between: list[tuple[float, float]] = field(default_factory=list)


def check(
    ledger: Iterable[PublishedEvent],
    clients: Iterable[ClientLog],
    *,
    history_size: int,
    idempotency_keys: bool,
) -> Report:
    """Judge every client's log against the ledger; the report lists each violation with its client and event."""
    events = list(ledger)
    logs = list(clients)
    report = Report()
    by_id: dict[str, PublishedEvent] = {}
    for event in events:
        by_id[event.event_id] = event
        report.events += event.position is not None
        report.ambiguous_publishes += event.ambiguous
    ranks = _epoch_ranks(events, logs)
    for client in logs:
        streams: dict[str, _Stream] = defaultdict(_Stream)
        for record in client.records:
            _walk(client.name, streams[record.subscription], record, report, by_id, ranks)
        for subscription, stream in streams.items():
            owed = [e for e in events if e.subscription == subscription and e.position is not None]
            _judge(client.name, subscription, stream, owed, ranks, report, history_size=history_size)
            _judge_duplicates(client.name, subscription, stream, by_id, report, idempotency_keys=idempotency_keys)
            _judge_final_state(client.name, subscription, stream, owed, ranks, report)
    return report


_Ranks = dict[tuple[str, str], float]


def _epoch_ranks(events: list[PublishedEvent], clients: list[ClientLog]) -> _Ranks:
    """(subscription, epoch) -> when it was first seen anywhere: epochs of a stream follow each other in time."""
    first: _Ranks = {}
    for event in events:
        for attempt in event.attempts:
            if attempt.epoch is not None:
                key = (event.subscription, attempt.epoch)
                first[key] = min(first.get(key, attempt.at_s), attempt.at_s)
    for client in clients:
        for record in client.records:
            key = (record.subscription, record.epoch)
            first[key] = min(first.get(key, record.at_s), record.at_s)
    return first


def _walk(
    client: str,
    stream: _Stream,
    record: Record,
    report: Report,
    by_id: dict[str, PublishedEvent],
    ranks: _Ranks,
) -> None:
    where = f"{client} {record.subscription}"
    cursor = stream.cursor
    if record.kind is not Kind.EVENT:
        if cursor is None:
            stream.windows.append(_Window(record.epoch, record.offset))
            stream.cursor = (record.epoch, record.offset)
            report.resyncs += record.kind is Kind.RESYNC
        elif record.kind is Kind.RESYNC or record.recovered is not True:
            report.resyncs += 1
            _move(stream, cursor, record, ranks)
        return
    report.deliveries += 1
    position = (record.epoch, record.offset)
    published = by_id.get(record.event_id or "")
    accepted = published.accepted if published else None
    if accepted is not None and accepted.epoch == record.epoch and accepted.offset == record.offset:
        report.worst_delay_s = max(report.worst_delay_s, record.at_s - accepted.at_s)
    if position in stream.delivered:
        report.duplicated += 1
        report.add(Violation.DUPLICATED, f"{where}: offset {record.offset} of epoch {record.epoch} delivered again")
        return
    if cursor is None:
        report.out_of_order += 1
        report.add(Violation.OUT_OF_ORDER, f"{where}: event {record.offset} before any subscribe acknowledgement")
        stream.windows.append(_Window(record.epoch, record.offset - 1))
    elif record.epoch != cursor[0]:
        report.add(Violation.UNTOLD_EPOCH, f"{where}: event {record.offset} of epoch {record.epoch} after {cursor}")
        stream.windows[-1].end = cursor[1]
        stream.windows.append(_Window(record.epoch, 0))
    elif record.offset < cursor[1]:
        report.out_of_order += 1
        report.add(Violation.OUT_OF_ORDER, f"{where}: offset {record.offset} after offset {cursor[1]}")
    if cursor is None or record.epoch != cursor[0] or record.offset > cursor[1]:
        stream.cursor = position
    stream.delivered[position] = record
    if record.data is not None and isinstance(record.data.get("id"), str):
        stream.last_by_transaction[record.data["id"]] = record


def _move(stream: _Stream, cursor: tuple[str, int], notice: Record, ranks: _Ranks) -> None:
    """A notice: the current window ends at the cursor, what lies between it and the new position is told."""
    epoch, offset = cursor
    stream.windows[-1].end = offset
    if notice.epoch == epoch:
        stream.told.append((epoch, offset, notice.offset, notice.at_s))
    else:
        stream.told.append((epoch, offset, None, notice.at_s))
        stream.told.append((notice.epoch, 0, notice.offset, notice.at_s))
        old_rank = ranks.get((notice.subscription, epoch), 0.0)
        stream.told_between.append((old_rank, ranks.get((notice.subscription, notice.epoch), 0.0)))
    stream.windows.append(_Window(notice.epoch, notice.offset))
    stream.cursor = (notice.epoch, notice.offset)


def _judge(
    client: str,
    subscription: str,
    stream: _Stream,
    owed: list[PublishedEvent],
    ranks: _Ranks,
    report: Report,
    *,
    history_size: int,
) -> None:
    """Every accepted event of this subscription is delivered, conflated, told, or it is a violation."""
    if not stream.windows:
        return
    first = stream.windows[0]
    first_rank = ranks.get((subscription, first.epoch), 0.0)
    for event in owed:
        assert event.position is not None
        epoch, offset = event.position
        rank = ranks.get((subscription, epoch), 0.0)
        if (epoch, offset) in stream.delivered:
            continue
        if rank < first_rank or (epoch == first.epoch and offset <= first.start):
            continue  # published before this client subscribed
        in_window = any(
            w.epoch == epoch and w.start < offset and (w.end is None or offset <= w.end) for w in stream.windows
        )
        told = [(b, at) for (e, a, b, at) in stream.told if e == epoch and a < offset and (b is None or offset <= b)]
        if in_window:
            if _superseded(stream, event, epoch, offset):
                report.conflated += 1
                continue
            report.lost += 1
            report.add(Violation.LOST, f"{client} {subscription}: offset {offset} of epoch {epoch} ({event.event_id})")
        elif told and all(b is not None and offset > _head(owed, epoch, at, b) - history_size for (b, at) in told):
            report.lost += 1
            report.add(
                Violation.SKIPPED_HELD,
                f"{client} {subscription}: offset {offset} of epoch {epoch} ({event.event_id}) was in the history, "
                f"but the notice placed the position at {max(b or 0 for (b, _) in told)}",
            )
        elif told or any(old < rank < new for (old, new) in stream.told_between):
            report.told += 1
        else:
            # After the client's last epoch, or skipped by an epoch change nobody announced.
            report.lost += 1
            report.add(Violation.LOST, f"{client} {subscription}: offset {offset} of epoch {epoch} ({event.event_id})")


def _head(owed: list[PublishedEvent], epoch: str, at_s: float, position: int) -> int:
    """The newest offset of `epoch` stored by `at_s` (at least `position`); the history held the last ones."""
    head = position
    for event in owed:
        accepted = event.accepted
        if accepted is not None and accepted.epoch == epoch and accepted.at_s <= at_s and accepted.offset is not None:
            head = max(head, accepted.offset)
    return head


def _superseded(stream: _Stream, event: PublishedEvent, epoch: str, offset: int) -> bool:
    if event.event_type != CONFLATABLE:
        return False
    # Only a newer update of the same transaction replaces an update in a send queue (service/outbox.py).
    return any(
        e == epoch
        and o > offset
        and r.event_type == CONFLATABLE
        and r.data is not None
        and r.data.get("id") == event.transaction_id
        for (e, o), r in stream.delivered.items()
    )


def _judge_duplicates(
    client: str,
    subscription: str,
    stream: _Stream,
    by_id: dict[str, PublishedEvent],
    report: Report,
    *,
    idempotency_keys: bool,
) -> None:
    """One publisher event at two offsets: a violation, unless it was ambiguous and keys were not available."""
    seen: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for (epoch, offset), record in stream.delivered.items():
        if record.event_id is not None:
            seen[record.event_id].append((epoch, offset))
    for event_id, positions in seen.items():
        if len(positions) < 2:
            continue
        published = by_id.get(event_id)
        if published is not None and published.ambiguous and not idempotency_keys:
            report.ambiguous_duplicates += len(positions) - 1
            continue
        report.duplicated += len(positions) - 1
        report.add(Violation.DUPLICATED, f"{client} {subscription}: event {event_id} delivered at {sorted(positions)}")


def _judge_final_state(
    client: str,
    subscription: str,
    stream: _Stream,
    owed: list[PublishedEvent],
    epoch_rank: _Ranks,
    report: Report,
) -> None:
    """The client's last view of each transaction is the last state accepted for it."""
    if not stream.windows:
        return
    start_epoch, start = stream.windows[0].epoch, stream.windows[0].start
    start_rank = epoch_rank.get((subscription, start_epoch), 0.0)
    last: dict[str, tuple[float, int, PublishedEvent]] = {}
    for event in owed:
        assert event.position is not None
        epoch, offset = event.position
        rank = epoch_rank.get((subscription, epoch), 0.0)
        if rank < start_rank or (epoch == start_epoch and offset <= start):
            continue  # published before this client subscribed
        key = (rank, offset, event)
        if event.transaction_id not in last or key[:2] > last[event.transaction_id][:2]:
            last[event.transaction_id] = key
    for transaction_id, (_, _, event) in sorted(last.items()):
        seen = stream.last_by_transaction.get(transaction_id)
        if seen is None or seen.data != event.data:
            report.final_state_mismatches += 1
            shown = None if seen is None else seen.event_id
            report.add(
                Violation.FINAL_STATE,
                f"{client} {subscription}: {transaction_id} ends at {shown}, last accepted is {event.event_id}",
            )


def check_outbox(
    writes: Iterable[OutboxWrite],
    clients: Iterable[ClientLog],
    *,
    history_size: int,
    rows_left: int,
) -> Report:
    """Judge the clients' logs against the outbox writers' record (see the module's docstring)."""
    writes = list(writes)
    logs = list(clients)
    ledger, first_seen = as_ledger(writes, logs)
    # Keys: the relay publishes with idempotencyKey outbox:<id>, so any second store is a violation.
    report = check(ledger, logs, history_size=history_size, idempotency_keys=True)
    counts = report.outbox = OutboxCounts(rows_left=rows_left)
    for write in writes:
        counts.committed += write.outcome is CommitOutcome.COMMITTED
        counts.rolled_back += write.outcome is CommitOutcome.ROLLED_BACK
        counts.unknown += write.outcome is CommitOutcome.UNKNOWN
        counts.unknown_delivered += write.outcome is CommitOutcome.UNKNOWN and write.event_id in first_seen
    report.events = counts.committed
    rolled_back = {w.event_id for w in writes if w.outcome is CommitOutcome.ROLLED_BACK}
    commit_index = {w.event_id: w.commit_index for w in writes if w.commit_index is not None}
    for client in logs:
        last_index: dict[str, tuple[int, str]] = {}
        handled: set[str] = set()
        for record in client.records:
            if record.kind is not Kind.EVENT or record.event_id is None:
                continue
            where = f"{client.name} {record.subscription}"
            if record.event_id in rolled_back:
                report.add(Violation.ROLLED_BACK_DELIVERED, f"{where}: {record.event_id} at offset {record.offset}")
            index = commit_index.get(record.event_id)
            if index is None or record.event_id in handled:
                continue  # not committed for sure, or a duplicate `check` already counts
            handled.add(record.event_id)
            before = last_index.get(record.subscription)
            if before is not None and index < before[0]:
                report.out_of_order += 1
                report.add(
                    Violation.COMMIT_ORDER,
                    f"{where}: {record.event_id} (commit {index}) after {before[1]} (commit {before[0]})",
                )
            else:
                last_index[record.subscription] = (index, record.event_id)
    for write in writes:
        if write.outcome is CommitOutcome.COMMITTED and write.event_id not in first_seen:
            if _conflated_everywhere(write, commit_index, logs):
                report.conflated += 1
            elif _told_after(logs, write.subscription, write.at_s):
                report.told += 1
            else:
                report.lost += 1
                report.add(Violation.LOST, f"{write.subscription}: committed {write.event_id} reached no client")
    if rows_left:
        report.add(Violation.OUTBOX_NOT_EMPTY, f"{rows_left} rows left in the outbox")
    return report


def as_ledger(writes: list[OutboxWrite], logs: list[ClientLog]) -> tuple[list[PublishedEvent], dict[str, Record]]:
    """Every write that committed as a published event, stored where a client first received it.

    A committed event nobody received has no position (`check` does not judge it); an unknown
    one nobody received may never have committed and is left out; rolled-back ones are left out.
    """
    first_seen: dict[str, Record] = {}
    for log in logs:
        for record in log.records:
            if record.kind is Kind.EVENT and record.event_id is not None:
                seen = first_seen.get(record.event_id)
                if seen is None or record.at_s < seen.at_s:
                    first_seen[record.event_id] = record
    ledger: list[PublishedEvent] = []
    for write in writes:
        seen = first_seen.get(write.event_id)
        if write.outcome is CommitOutcome.ROLLED_BACK or (write.outcome is CommitOutcome.UNKNOWN and seen is None):
            continue
        offset, epoch = (seen.offset, seen.epoch) if seen is not None else (None, None)
        attempt = Attempt(Outcome.ACCEPTED, write.at_s, offset, epoch)
        ledger.append(
            PublishedEvent(
                write.event_id, write.subscription, write.transaction_id, write.event_type, write.data, [attempt]
            )
        )
    return ledger, first_seen


def _conflated_everywhere(write: OutboxWrite, commit_index: dict[str, int], logs: list[ClientLog]) -> bool:
    """Whether every client of its channel got a later-committed update of its transaction instead (conflation)."""
    if write.event_type != CONFLATABLE or write.commit_index is None:
        return False
    subscribers = [log for log in logs if any(r.subscription == write.subscription for r in log.records)]
    return bool(subscribers) and all(
        any(
            r.kind is Kind.EVENT
            and r.subscription == write.subscription
            and r.event_type == CONFLATABLE
            and r.data is not None
            and r.data.get("id") == write.transaction_id
            and commit_index.get(r.event_id or "", 0) > write.commit_index
            for r in log.records
        )
        for log in subscribers
    )


def _told_after(logs: list[ClientLog], subscription: str, at_s: float) -> bool:
    """Whether every client of `subscription` got a notice (resync, or an unrecovered resume) after `at_s`."""
    subscribers = [log for log in logs if any(r.subscription == subscription for r in log.records)]
    return bool(subscribers) and all(
        any(
            r.subscription == subscription
            and r.at_s >= at_s
            and (r.kind is Kind.RESYNC or (r.kind is Kind.SUBSCRIBED and r.recovered is False))
            for r in log.records
        )
        for log in subscribers
    )


def render_table(report: Report, faults: dict[str, int], recovery_s: dict[str, float]) -> str:
    """The run's summary: faults by kind with the worst recovery after each kind, then the delivery counts."""
    lines = ["| fault | injected | worst time to recover (s) |", "|---|---:|---:|"]
    for kind in sorted(faults):
        recovered = recovery_s.get(kind)
        lines.append(f"| {kind} | {faults[kind]} | {'-' if recovered is None else f'{recovered:.1f}'} |")
    lines += ["", "| measure | value |", "|---|---:|"]
    outbox = report.outbox
    rows: list[tuple[str, object]] = [
        ("events accepted (2xx)", report.events),
    ]
    if outbox is not None:
        rows = [
            ("outbox events committed", outbox.committed),
            ("outbox events rolled back (or failed before the commit)", outbox.rolled_back),
            ("outbox commits with an unknown outcome", outbox.unknown),
            ("of which delivered (they had committed)", outbox.unknown_delivered),
            ("rows left in the outbox", outbox.rows_left),
        ]
    rows += [
        ("publishes with an ambiguous attempt", report.ambiguous_publishes),
        ("deliveries", report.deliveries),
        ("lost", report.lost),
        ("duplicated", report.duplicated),
        ("duplicated after an ambiguous publish (no idempotency keys)", report.ambiguous_duplicates),
        ("out of order", report.out_of_order),
        ("resyncs", report.resyncs),
        ("missed after a resync (told)", report.told),
        ("conflated updates", report.conflated),
        ("final state mismatches", report.final_state_mismatches),
        (f"worst delay from {'commit' if outbox else '2xx'} to delivery (s)", f"{report.worst_delay_s:.1f}"),
        ("violations", len(report.violations)),
    ]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)
