"""Review 46, area F: one size-limited producer fake (testing/group_consumer.py) for the too-large tests, in place of
the copies in test_review45_E_too_large.py and test_review46_K_desk_limit.py and of test_review45_B_desk.py's."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from testing.group_consumer import Broker, LimitedProducer


def parameters(method: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]


@pytest.mark.parametrize("name", ["send", "flush", "close"])
def test_the_limited_producer_takes_kafka_pythons_arguments(name: str) -> None:
    # The copies took send(topic, key, value, headers) and flush(timeout) without a default.
    assert parameters(getattr(LimitedProducer, name)) == parameters(getattr(KafkaProducer, name))


def test_a_refusal_fails_every_send_of_the_flush_with_one_exception_the_refused_first() -> None:
    broker = Broker({"out": 100})
    producer = LimitedProducer(broker)
    futures = [producer.send("out", b"v" * size, key=b"k") for size in (10, 200, 10)]
    failures: list[tuple[int, BaseException]] = []
    for i, future in enumerate(futures):
        future.add_errback(lambda error, i=i: failures.append((i, error)))
    assert not any(f.is_done for f in futures), "done at the flush, not before"
    producer.flush()
    assert [i for i, _ in failures] == [1, 0, 2] and len({id(e) for _, e in failures}) == 1
    assert isinstance(failures[0][1], MessageSizeTooLargeError) and broker.acked == [] and broker.events == []


def test_a_get_delivers_and_a_broker_error_fails_every_send() -> None:
    broker = Broker({"out": 100})
    producer = LimitedProducer(broker)
    assert producer.send("out", b"v", headers=[("h", b"x")]).get(timeout=1).offset == 0  # the IO thread goes on
    assert broker.acked == [("out", b"v", [("h", b"x")])] and broker.events == [("ack", "out")]
    broker.error = KafkaTimeoutError("expired")
    late = producer.send("out", b"v")
    with pytest.raises(KafkaTimeoutError):
        late.get(timeout=1)
    assert len(broker.topics.messages("out")) == 1


def test_send_refuses_at_once_what_is_over_max_request_size_by_kafka_pythons_estimate() -> None:
    producer = LimitedProducer(Broker({}), max_request_size=200)
    producer.send("out", b"v" * 100)  # 100 bytes and the record batch's overhead
    with pytest.raises(MessageSizeTooLargeError, match="max_request_size"):
        producer.send("out", b"v" * 120)
    assert producer.sent_topics == ["out"]
