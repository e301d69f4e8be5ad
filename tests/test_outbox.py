"""The per-connection send queue: bounded, conflating superseded transaction updates."""

from __future__ import annotations

from service.outbox import Outbox


def test_frames_come_out_in_order():
    box = Outbox(4)
    for frame in (b"a", b"b", b"c"):
        assert box.put(frame)
    assert box.pop_all() == [b"a", b"b", b"c"]
    assert len(box) == 0


def test_put_refuses_beyond_capacity():
    box = Outbox(2)
    assert box.put(b"a")
    assert box.put(b"b")
    assert not box.put(b"c")
    assert box.pop_all() == [b"a", b"b"]


def test_newer_update_of_a_transaction_replaces_the_queued_one_and_moves_back():
    box = Outbox(3)
    box.put(b"T1 v1", "T1")
    box.put(b"T2 new")
    box.put(b"T1 v2", "T1")
    assert box.pop_all() == [b"T2 new", b"T1 v2"]
    assert box.conflated == 1


def test_only_superseded_updates_are_dropped():
    box = Outbox(8)
    for frame, key in [(b"A1", "A"), (b"B1", "B"), (b"stage", None), (b"A2", "A"), (b"C1", "C"), (b"A3", "A")]:
        box.put(frame, key)
    assert box.pop_all() == [b"B1", b"stage", b"C1", b"A3"]
    assert box.conflated == 2


def test_conflation_makes_room_in_a_full_outbox():
    box = Outbox(2)
    box.put(b"T1 v1", "T1")
    box.put(b"T2 new")
    assert box.put(b"T1 v2", "T1")
    assert box.conflated == 1
    assert not box.put(b"T3 new")
    assert box.pop_all() == [b"T2 new", b"T1 v2"]


def test_a_full_outbox_of_distinct_updates_refuses_more():
    box = Outbox(2)
    box.put(b"T1 v1", "T1")
    box.put(b"T2 v1", "T2")
    assert not box.put(b"T3 v1", "T3")
    assert box.conflated == 0


def test_after_a_pop_an_update_is_queued_again_not_conflated():
    box = Outbox(2)
    box.put(b"T1 v1", "T1")
    assert box.pop_all() == [b"T1 v1"]
    box.put(b"T1 v2", "T1")
    assert box.conflated == 0
    assert box.pop_all() == [b"T1 v2"]
