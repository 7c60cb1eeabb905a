"""The controller's Kafka executor raises when its published batch is not acknowledged."""

from __future__ import annotations

from typing import Any

import pytest

from synpref.services.controller.executors import KafkaExecutor
from synpref.shared.config import Settings, TopicSettings
from synpref.shared.kafka import clients
from synpref.shared.kafka.clients import DeliveryError
from synpref.shared.pairs import new_pair, new_record


class Refused:
    is_done = True
    exception = RuntimeError("NotEnoughReplicas")

    def failed(self) -> bool:
        return True


class RefusingProducer:
    def __init__(self) -> None:
        self.closed = False

    def send(self, topic: str, key: Any, value: bytes, headers: Any) -> Refused:
        return Refused()

    def flush(self, timeout: float) -> None:
        return None

    def close(self) -> None:
        self.closed = True


class IdleConsumer:
    polls = 0

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def assign(self, parts: Any) -> None: ...

    def seek_to_end(self, *parts: Any) -> None: ...

    def position(self, tp: Any) -> int:
        return 0

    def poll(self, timeout_ms: int) -> dict:
        IdleConsumer.polls += 1
        return {}

    def close(self) -> None: ...


def test_an_unacknowledged_publish_raises_instead_of_waiting_for_results(monkeypatch: pytest.MonkeyPatch) -> None:
    producer = RefusingProducer()
    monkeypatch.setattr(clients, "make_producer", lambda kafka: producer)
    monkeypatch.setattr(clients, "make_consumer", lambda kafka, group, **kw: IdleConsumer())
    pair = new_pair([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
                    [{"role": "assistant", "content": "b"}], source="unit")  # fmt: skip
    executor = KafkaExecutor(Settings(topics=TopicSettings(s1_raw="in")), timeout_s=30)
    with pytest.raises(DeliveryError, match="1 of 1 messages not acknowledged"):
        executor.run("stage1", [new_record(pair)])
    assert IdleConsumer.polls == 0, "no wait for results of a batch that was never published"
    assert producer.closed
