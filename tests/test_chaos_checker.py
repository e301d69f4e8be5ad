"""The chaos checker on synthetic logs: a clean run passes, and each kind of violation is caught and named."""

from __future__ import annotations

from typing import Any

from fleet.chaos.checker import (
    Attempt,
    ClientLog,
    CommitOutcome,
    Kind,
    OutboxWrite,
    Outcome,
    PublishedEvent,
    Record,
    Report,
    Violation,
    check,
    check_outbox,
    render_table,
)

SUB = "transactions:CUST-001"


class Run:
    """A tiny scripted run: the publisher's ledger and one client's log, with a clock that ticks per step."""

    def __init__(self) -> None:
        self.ledger: list[PublishedEvent] = []
        self.log = ClientLog("client-1", "python")
        self.clock = 0.0
        self.versions: dict[str, int] = {}

    def tick(self) -> float:
        self.clock += 1.0
        return self.clock

    def publish(
        self,
        offset: int | None,
        epoch: str = "e1",
        *,
        transaction: str = "TXN-1",
        event_type: str = "transaction_update",
        ambiguous: bool = False,
    ) -> PublishedEvent:
        version = self.versions[transaction] = self.versions.get(transaction, 0) + 1
        data: dict[str, Any] = {"id": transaction, "customerId": "CUST-001", "status": f"v{version}"}
        event = PublishedEvent(f"ev-{len(self.ledger)}", SUB, transaction, event_type, data)
        if ambiguous:
            event.attempts.append(Attempt(Outcome.AMBIGUOUS, self.tick()))
        if offset is not None:
            event.attempts.append(Attempt(Outcome.ACCEPTED, self.tick(), offset, epoch))
        self.ledger.append(event)
        return event

    def subscribed(self, offset: int, epoch: str = "e1", recovered: bool | None = None) -> None:
        self.log.records.append(Record(Kind.SUBSCRIBED, SUB, offset, epoch, self.tick(), recovered=recovered))

    def resync(self, offset: int, epoch: str) -> None:
        self.log.records.append(Record(Kind.RESYNC, SUB, offset, epoch, self.tick()))

    def deliver(self, event: PublishedEvent, offset: int | None = None, epoch: str | None = None) -> None:
        position = event.position
        assert position is not None or (offset is not None and epoch is not None)
        record = Record(
            Kind.EVENT,
            SUB,
            offset if offset is not None else position[1],  # type: ignore[index]
            epoch if epoch is not None else position[0],  # type: ignore[index]
            self.tick(),
            event_id=event.event_id,
            event_type=event.event_type,
            data=event.data,
        )
        self.log.records.append(record)

    def check(self, *, idempotency_keys: bool = False, history_size: int = 100) -> Report:
        return check(self.ledger, [self.log], history_size=history_size, idempotency_keys=idempotency_keys)


def kinds(report: Report) -> set[Violation]:
    return {kind for kind, _ in report.violations}


def test_every_event_delivered_once_in_order_passes():
    run = Run()
    before = run.publish(1)
    run.subscribed(1)
    events = [run.publish(offset) for offset in range(2, 7)]
    for event in events:
        run.deliver(event)
    report = run.check()
    assert report.ok, report.violations
    assert (report.events, report.deliveries, report.lost, report.duplicated) == (6, 5, 0, 0)
    assert before.position == ("e1", 1)


def test_an_event_never_delivered_is_lost():
    run = Run()
    run.subscribed(0)
    first, missing, last = run.publish(1), run.publish(2, transaction="TXN-2"), run.publish(3)
    run.deliver(first)
    run.deliver(last)
    report = run.check()
    assert kinds(report) == {Violation.LOST, Violation.FINAL_STATE}
    assert report.lost == 1
    assert missing.event_id in report.violations[0][1]


def test_the_tail_not_delivered_by_the_end_is_lost():
    run = Run()
    run.subscribed(0)
    run.deliver(run.publish(1))
    run.publish(2, event_type="stage_change")
    assert Violation.LOST in kinds(run.check())


def test_the_same_offset_twice_is_a_duplicate():
    run = Run()
    run.subscribed(0)
    event = run.publish(1)
    run.deliver(event)
    run.deliver(event)
    report = run.check()
    assert kinds(report) == {Violation.DUPLICATED}
    assert report.duplicated == 1


def test_a_retried_publish_stored_twice_is_ambiguous_without_idempotency_keys_and_a_violation_with_them():
    run = Run()
    run.subscribed(0)
    event = run.publish(2, ambiguous=True)
    run.deliver(event, offset=1, epoch="e1")  # the first attempt was stored after all
    run.deliver(event)
    without = run.check(idempotency_keys=False)
    assert without.ok, without.violations
    assert (without.ambiguous_duplicates, without.duplicated, without.ambiguous_publishes) == (1, 0, 1)
    with_keys = run.check(idempotency_keys=True)
    assert kinds(with_keys) == {Violation.DUPLICATED}


def test_an_unambiguous_event_at_two_offsets_is_a_duplicate_even_without_keys():
    run = Run()
    run.subscribed(0)
    event = run.publish(2)
    run.deliver(event, offset=1, epoch="e1")
    run.deliver(event)
    assert kinds(run.check(idempotency_keys=False)) == {Violation.DUPLICATED}


def test_offsets_going_backwards_are_out_of_order():
    run = Run()
    run.subscribed(0)
    one, two = run.publish(1), run.publish(2, transaction="TXN-2")
    run.deliver(two)
    run.deliver(one)
    report = run.check()
    assert kinds(report) == {Violation.OUT_OF_ORDER}
    assert report.out_of_order == 1


def test_a_resync_to_a_new_epoch_tells_the_old_tail_and_owes_everything_after_its_position():
    run = Run()
    run.subscribed(0)
    run.deliver(run.publish(1))
    run.publish(2)  # stored only in the epoch Redis lost
    replayed = [run.publish(offset, "e2") for offset in (1, 2)]
    run.resync(0, "e2")
    for event in replayed:
        run.deliver(event)
    report = run.check()
    assert report.ok, report.violations
    assert (report.resyncs, report.told, report.lost) == (1, 1, 0)


def test_a_resync_placed_after_events_the_new_history_holds_is_a_loss():
    # The defect of a resync at the current offset: the new epoch held 1..2, the client got none.
    run = Run()
    run.subscribed(0)
    run.deliver(run.publish(1))
    run.publish(1, "e2")
    run.publish(2, "e2", transaction="TXN-2")
    run.resync(2, "e2")
    last = run.publish(3, "e2")
    run.deliver(last)
    report = run.check(history_size=100)
    assert Violation.SKIPPED_HELD in kinds(report)
    assert report.lost == 2


def test_a_resume_from_before_the_history_window_is_told_what_left_it():
    run = Run()
    run.subscribed(0)
    run.deliver(run.publish(1))
    run.publish(2)
    held = run.publish(3)
    run.subscribed(2, recovered=False)  # history_size 1: offset 2 had left the window, 3 is replayed
    run.deliver(held)
    run.deliver(run.publish(4))
    report = run.check(history_size=1)
    assert report.ok, report.violations
    assert (report.told, report.resyncs) == (1, 1)


def test_an_epoch_change_without_a_notice_is_a_violation():
    run = Run()
    run.subscribed(0)
    run.deliver(run.publish(1))
    run.publish(2)
    run.deliver(run.publish(1, "e2"))
    report = run.check()
    assert Violation.UNTOLD_EPOCH in kinds(report)
    assert report.lost == 1


def test_events_of_a_later_epoch_the_client_never_reached_are_lost():
    run = Run()
    run.subscribed(0)
    run.deliver(run.publish(1))
    run.publish(1, "e2", event_type="stage_change")
    assert Violation.LOST in kinds(run.check())


def test_a_conflated_update_is_not_lost_but_a_skipped_stage_change_is():
    run = Run()
    run.subscribed(0)
    run.publish(1)
    run.deliver(run.publish(2))
    report = run.check()
    assert report.ok, report.violations
    assert report.conflated == 1

    run = Run()
    run.subscribed(0)
    run.publish(1, event_type="stage_change")
    run.deliver(run.publish(2))
    assert Violation.LOST in kinds(run.check())

    run = Run()
    run.subscribed(0)
    run.publish(1)
    run.deliver(run.publish(2, event_type="stage_change"))  # a stage change replaces no update
    assert Violation.LOST in kinds(run.check())


def test_a_resumed_subscription_owes_what_was_published_while_away():
    run = Run()
    run.subscribed(0)
    run.deliver(run.publish(1))
    missed = run.publish(2)
    run.subscribed(1, recovered=True)  # reconnected, nothing replayed
    run.deliver(run.publish(3, transaction="TXN-2"))
    report = run.check()
    assert Violation.LOST in kinds(report)
    assert missed.event_id in report.violations[0][1]


def test_a_final_state_that_is_not_the_last_published_is_a_violation():
    run = Run()
    run.subscribed(0)
    first = run.publish(1)
    second = run.publish(2, event_type="stage_change")
    run.deliver(second)
    run.deliver(first, offset=3, epoch="e1")  # the older state arrives last, at an offset nobody accepted
    report = run.check()
    assert Violation.FINAL_STATE in kinds(report)


def test_events_published_before_the_subscription_are_not_owed():
    run = Run()
    run.publish(1)
    run.publish(2)
    run.subscribed(2)
    run.deliver(run.publish(3))
    assert run.check().ok


def test_the_table_names_each_fault_kind_and_the_counts():
    run = Run()
    run.subscribed(0)
    run.deliver(run.publish(1))
    table = render_table(run.check(), {"redis_kill": 2, "nginx_reload": 1}, {"redis_kill": 3.25})
    assert "| redis_kill | 2 | 3.2 |" in table
    assert "| nginx_reload | 1 | - |" in table
    assert "| lost | 0 |" in table
    assert "| deliveries | 1 |" in table


class OutboxRun:
    """A scripted outbox run: the writers' record of each transaction and two clients' logs on one channel."""

    def __init__(self) -> None:
        self.writes: list[OutboxWrite] = []
        self.logs = [ClientLog("client-1", "python"), ClientLog("client-2", "node")]
        self.clock = 0.0
        self.commits = 0

    def tick(self) -> float:
        self.clock += 1.0
        return self.clock

    def write(
        self, outcome: CommitOutcome, transaction: str = "TXN-1", event_type: str = "stage_change"
    ) -> OutboxWrite:
        event_id = f"writer-0-{len(self.writes)}"
        data: dict[str, Any] = {"id": transaction, "customerId": "CUST-001", "seq": event_id}
        write = OutboxWrite(event_id, SUB, transaction, event_type, data, outcome, self.tick())
        if outcome is CommitOutcome.COMMITTED:
            self.commits += 1
            write.commit_index = self.commits
        self.writes.append(write)
        return write

    def subscribed(self, offset: int = 0, epoch: str = "e1") -> None:
        for log in self.logs:
            log.records.append(Record(Kind.SUBSCRIBED, SUB, offset, epoch, self.tick()))

    def resync(self, offset: int, epoch: str = "e1") -> None:
        for log in self.logs:
            log.records.append(Record(Kind.RESYNC, SUB, offset, epoch, self.tick()))

    def deliver(self, write: OutboxWrite, offset: int, *, clients: tuple[int, ...] = (0, 1), epoch: str = "e1") -> None:
        for index in clients:
            record = Record(
                Kind.EVENT,
                SUB,
                offset,
                epoch,
                self.tick(),
                event_id=write.event_id,
                event_type=write.event_type,
                data=write.data,
            )
            self.logs[index].records.append(record)

    def check(self, rows_left: int = 0) -> Report:
        return check_outbox(self.writes, self.logs, history_size=100, rows_left=rows_left)


def test_outbox_committed_events_once_in_commit_order_and_nothing_else_passes():
    run = OutboxRun()
    run.subscribed()
    first = run.write(CommitOutcome.COMMITTED)
    run.write(CommitOutcome.ROLLED_BACK)
    unknown_committed = run.write(CommitOutcome.UNKNOWN)
    run.write(CommitOutcome.UNKNOWN)  # it did not commit: nobody gets it, and that is fine
    second = run.write(CommitOutcome.COMMITTED, transaction="TXN-2")
    run.deliver(first, 1)
    run.deliver(unknown_committed, 2)
    run.deliver(second, 3)
    report = run.check()
    assert report.ok, report.violations
    assert report.outbox is not None
    assert (report.outbox.committed, report.outbox.rolled_back, report.outbox.unknown) == (2, 1, 2)
    assert report.outbox.unknown_delivered == 1
    assert (report.events, report.deliveries, report.lost, report.duplicated) == (2, 6, 0, 0)
    assert report.worst_delay_s > 0  # from the commit to the delivery


def test_outbox_rolled_back_event_delivered_is_a_violation():
    run = OutboxRun()
    run.subscribed()
    rolled_back = run.write(CommitOutcome.ROLLED_BACK)
    run.deliver(rolled_back, 1, clients=(1,))
    assert kinds(run.check()) == {Violation.ROLLED_BACK_DELIVERED}


def test_outbox_committed_or_unknown_event_delivered_twice_is_duplicated():
    for outcome in (CommitOutcome.COMMITTED, CommitOutcome.UNKNOWN):
        run = OutboxRun()
        run.subscribed()
        write = run.write(outcome)
        run.deliver(write, 1)
        run.deliver(write, 2, clients=(0,))  # stored again at a new offset
        report = run.check()
        assert kinds(report) == {Violation.DUPLICATED}, outcome
        assert report.duplicated == 1


def test_outbox_events_in_offset_order_but_not_commit_order_are_caught():
    run = OutboxRun()
    run.subscribed()
    earlier, later = run.write(CommitOutcome.COMMITTED), run.write(CommitOutcome.COMMITTED, transaction="TXN-2")
    run.deliver(later, 1)
    run.deliver(earlier, 2)
    report = run.check()
    assert kinds(report) == {Violation.COMMIT_ORDER}
    assert report.out_of_order == 2  # one per client


def test_outbox_committed_event_no_client_got_is_lost_unless_every_client_was_told():
    run = OutboxRun()
    run.subscribed()
    run.write(CommitOutcome.COMMITTED)
    report = run.check()
    assert kinds(report) == {Violation.LOST}
    assert report.lost == 1

    run.resync(5)  # both clients told after the commit
    report = run.check()
    assert report.ok, report.violations
    assert report.told == 1


def test_outbox_committed_event_one_client_missed_is_lost():
    run = OutboxRun()
    run.subscribed()
    first, second = run.write(CommitOutcome.COMMITTED), run.write(CommitOutcome.COMMITTED)
    run.deliver(first, 1)
    run.deliver(second, 2, clients=(0,))
    report = run.check()
    assert kinds(report) == {Violation.LOST, Violation.FINAL_STATE}  # client-2 also ends at the first state
    assert any("client-2" in detail for _, detail in report.violations)


def test_outbox_rows_left_after_the_run_are_a_violation_and_in_the_table():
    run = OutboxRun()
    run.subscribed()
    run.deliver(run.write(CommitOutcome.COMMITTED), 1)
    report = run.check(rows_left=3)
    assert kinds(report) == {Violation.OUTBOX_NOT_EMPTY}
    table = render_table(report, {"postgres_kill_restart": 1}, {"postgres_kill_restart": 2.5})
    assert "| postgres_kill_restart | 1 | 2.5 |" in table
    assert "| rows left in the outbox | 3 |" in table
    assert "| outbox events committed | 1 |" in table
    assert "worst delay from commit to delivery" in table


def test_outbox_update_no_client_got_is_conflated_when_every_client_got_a_later_update_of_its_transaction():
    for event_type, conflated in (("transaction_update", True), ("stage_change", False)):
        run = OutboxRun()
        run.subscribed()
        run.write(CommitOutcome.COMMITTED, event_type=event_type)  # replaced in the send queues of a replay
        run.deliver(run.write(CommitOutcome.COMMITTED, event_type="transaction_update"), 2)
        report = run.check()
        assert report.ok is conflated, (event_type, report.violations)
        assert report.conflated == int(conflated)
