"""ReadinessLog: one log line per change of broker readiness, including reconnects shorter than a sample."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from structlog.testing import capture_logs

from service import metrics
from service.broker.readiness import ReadinessLog


class FakeBroker:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.disconnects = 0

    def readiness_log(self) -> ReadinessLog:
        return ReadinessLog(
            pod_id="pod-r",
            reasons=lambda: list(self.reasons),
            disconnects=lambda: (self.disconnects, 0.0),
            canary_lag_s=lambda: 0.5,
            channels=lambda: 3,
        )


def events(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [entry["event"] for entry in logs]


def test_the_first_ready_sample_logs_broker_ready_once() -> None:
    broker = FakeBroker()
    readiness = broker.readiness_log()
    with capture_logs() as logs:
        readiness.check()
        readiness.check()
    assert events(logs) == ["broker_ready"]
    assert metrics.BROKER_READY._value.get() == 1
    assert metrics.BROKER_CANARY_LAG._value.get() == 0.5


def test_a_deaf_period_is_logged_once_when_it_starts_and_once_when_it_ends() -> None:
    broker = FakeBroker()
    readiness = broker.readiness_log()
    readiness.check()
    with capture_logs() as logs:
        broker.reasons = ["broker_canary_lag"]
        readiness.check()
        assert metrics.BROKER_READY._value.get() == 0
        broker.reasons = ["broker_not_ready"]
        readiness.check()
        broker.reasons = []
        readiness.check()
    assert events(logs) == ["broker_deaf", "broker_recovered"]
    assert logs[0]["reasons"] == ["broker_canary_lag"]
    assert logs[1]["deaf_s"] >= 0
    assert logs[1]["channels"] == 3


def test_a_reconnect_between_two_samples_is_still_a_deaf_period() -> None:
    broker = FakeBroker()
    readiness = broker.readiness_log()
    readiness.check()
    with capture_logs() as logs:
        broker.disconnects += 1
        readiness.check()
    assert events(logs) == ["broker_deaf", "broker_recovered"]
    assert logs[0]["reasons"] == ["broker_not_ready"]


def test_deaf_at_start_is_followed_by_broker_recovered() -> None:
    broker = FakeBroker()
    readiness = broker.readiness_log()
    broker.reasons = ["broker_not_ready"]
    with capture_logs() as logs:
        readiness.deaf_at_start()
        broker.disconnects += 5  # failed attempts while Redis was away: already reported
        readiness.check()
        broker.reasons = []
        readiness.check()
    assert events(logs) == ["broker_deaf", "broker_recovered"]
    assert logs[0]["at_start"] is True
