"""The in-process broker passes the same contract suite as the Redis broker."""

from __future__ import annotations

from typing import Any

import pytest

from service.broker.memory import MemoryBroker
from tests.broker_contract import BrokerContract, BrokerFactory


class TestMemoryBrokerContract(BrokerContract):
    @pytest.fixture
    def make_broker(self) -> BrokerFactory:
        def make(**options: Any) -> MemoryBroker:
            return MemoryBroker(history_size=options.get("history_size", 1000))

        return make
