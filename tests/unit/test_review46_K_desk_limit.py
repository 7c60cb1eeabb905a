"""Review 46, area K: a decision the broker refuses as too large (a topic's max.message.bytes lowered while the desk
runs) teaches the desk that topic's lower limit, as the runner learns it for its own outputs, so that the desk's retry
dead-letters the decision instead of being refused on every tick for ever."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from kafka.errors import KafkaError

from synpref.services.desk.kafka_queue import KafkaDeskQueues
from synpref.shared.config import KafkaSettings, TopicSettings
from synpref.shared.kafka import runner as runner_module
from synpref.shared.kafka.clients import DeliveryError
from synpref.shared.kafka.codec import DLQ_KIND, DLQ_REASON, decode_record, encode_record, header_map
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord
from testing.group_consumer import Broker, LimitedProducer

TOPICS = TopicSettings()


def record(i: int, chars: int = 10) -> PairRecord:
    return new_record(new_pair([{"role": "user", "content": f"q{i}" + "x" * chars}],
                               [{"role": "assistant", "content": f"a{i}"}],
                               [{"role": "assistant", "content": f"b{i}"}], source="unit"))  # fmt: skip


class Consumer:
    def assignment(self) -> set[Any]:
        return set()

    def close(self, autocommit: bool = True) -> None:
        return None


def desk_on(
    monkeypatch: pytest.MonkeyPatch, limits: dict[str, int]
) -> tuple[KafkaDeskQueues, list[LimitedProducer], list[tuple[str, bytes | None, Any]]]:
    """The desk's queues connected to the fake broker; DescribeConfigs refused, as without the permission."""
    broker = Broker(limits)
    producers = [LimitedProducer(broker)]
    queues = KafkaDeskQueues(KafkaSettings(), TOPICS, "g")
    queues.runner.consumer, queues.runner.producer = Consumer(), producers[0]

    def make_producer(kafka: KafkaSettings, **overrides: Any) -> LimitedProducer:
        producers.append(LimitedProducer(broker))
        return producers[-1]

    def message_limits(kafka: KafkaSettings, topics: Any, timeout_s: float) -> dict[str, int]:
        raise KafkaError("TopicAuthorizationFailedError: no DescribeConfigs")

    monkeypatch.setattr(runner_module, "make_producer", make_producer)
    monkeypatch.setattr(runner_module, "message_limits", message_limits)
    return queues, producers, broker.acked


def test_a_decision_refused_as_too_large_is_dead_lettered_on_the_retry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    big, small = record(1, 3000), record(2)
    queues, producers, acked = desk_on(monkeypatch, {TOPICS.verified: 2000})
    decisions = [("verified", small), ("verified", big)]

    async def main() -> None:
        try:
            with pytest.raises(DeliveryError):
                await queues.sink.write(decisions)  # the desk keeps the decisions in its outbox and retries
            await queues.sink.write(decisions)  # old code: refused again, on every retry
        finally:
            await queues.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    size = encode_record(big, TOPICS.verified).size
    assert queues.runner.topic_limits == {TOPICS.verified: size - 1}
    assert any(f"its limit is taken as {size - 1} bytes" in r.getMessage() for r in caplog.records), caplog.text
    assert len(producers) == 2 and all(p.closed for p in producers), "the failed producer is replaced and closed"
    assert [(topic, decode_record(value, headers).pair.id) for topic, value, headers in acked] == [
        (TOPICS.verified, small.pair.id),
        (TOPICS.dead_letter, big.pair.id),
    ]
    letter = header_map(acked[1][2])
    assert letter[DLQ_KIND] == "too-large" and f"over the {size - 1}-byte message limit" in letter[DLQ_REASON]


def test_a_failure_that_is_no_refusal_teaches_nothing_and_still_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    queues, producers, acked = desk_on(monkeypatch, {})
    producers[0].flush_error = KafkaError("broker away: the delivery timed out")

    async def main() -> None:
        try:
            with pytest.raises(DeliveryError):
                await queues.sink.write([("verified", record(3))])
        finally:
            await queues.close()

    asyncio.run(main())
    assert queues.runner.topic_limits == {} and len(producers) == 1 and acked == []
