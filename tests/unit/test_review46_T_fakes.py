"""Review 46, area T: the Kafka fakes in testing/group_consumer.py take kafka-python 3.0.12's arguments and behave as
its clients do where the product relies on it.

Each test file had its own fake producer and consumer: one whose position() missed kafka-python's timeout_ms broke
CI, and futures without add_errback kept a test-only fallback in Outbox.send. The tests now share these fakes.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotEnoughReplicasError,
)
from kafka.future import Future
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata, TopicPartition

from synpref.shared.kafka.clients import DeliveryError, Outbox
from synpref.shared.kafka.codec import Outgoing
from testing.group_consumer import Clock, GroupConsumer, RecordingProducer, Sent, Topics, TopicsConsumer

TP = TopicPartition("in", 0)


def parameters(method: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]


@pytest.mark.parametrize(
    ("fake", "real", "methods"),
    [
        (GroupConsumer, KafkaConsumer, "poll commit commit_async seek assignment highwater position close"),
        (TopicsConsumer, KafkaConsumer, "partitions_for_topic assign assignment seek seek_to_end position poll close"),
        (RecordingProducer, KafkaProducer, "send flush close"),
        (Sent, FutureRecordMetadata, "get"),
    ],
)
def test_the_fakes_take_kafka_pythons_arguments(fake: type, real: type, methods: str) -> None:
    # Old fakes: poll(timeout_ms, max_records) without defaults, position(tp, timeout_ms=0), send(topic, key, ...).
    for name in methods.split():
        assert parameters(getattr(fake, name)) == parameters(getattr(real, name)), f"{fake.__name__}.{name}"


def test_a_send_already_failed_runs_the_errback_at_once_and_the_outbox_names_the_refused_message() -> None:
    big = Outgoing("out", b"big", b"v" * 300, [])
    producer = RecordingProducer(fail=lambda topic, key: MessageSizeTooLargeError() if key == b"big" else None)
    outbox = Outbox(producer, 5)
    outbox.send([Outgoing("out", b"small", b"v", []), big])  # the refusal is done before Outbox adds its errback
    with pytest.raises(DeliveryError, match="1 of 2 messages not acknowledged") as raised:
        outbox.flush()
    assert raised.value.too_large == ("out", big.size)
    assert [m.key for m in producer.topics.messages("out")] == [b"small"], "only what was acknowledged"


def test_a_future_completes_at_the_flush_or_in_get_as_the_io_thread_goes_on() -> None:
    producer = RecordingProducer(at_flush=True, fail=lambda topic, key: NotEnoughReplicasError() if key else None)
    acked, refused = producer.send("out", b"v"), producer.send("out", b"v", key=b"k")
    errors: list[BaseException] = []
    refused.add_errback(errors.append)
    assert not acked.is_done and not refused.is_done and errors == []
    assert acked.get(timeout=1).offset == 0 and refused.failed() and errors == [refused.exception]
    with pytest.raises(NotEnoughReplicasError):
        refused.get(timeout=1)
    with pytest.raises(KafkaTimeoutError):
        Sent(lambda: None).get(timeout=1)  # an IO thread that never answers


def test_an_async_commit_of_a_dropped_member_fails_its_future_and_callback_without_raising() -> None:
    clock = Clock()
    consumer = GroupConsumer([], clock, TP, 1000)
    answers: list[Any] = []
    offsets = {TP: OffsetAndMetadata(3, "", -1)}
    assert consumer.commit_async(offsets, lambda o, response: answers.append(response)).succeeded()
    clock.now = 2.0  # past max.poll.interval.ms without a poll
    future = consumer.commit_async(offsets, lambda o, response: answers.append(response))
    assert isinstance(future, Future) and isinstance(future.exception, CommitFailedError)
    assert answers[0] is None and isinstance(answers[1], CommitFailedError) and consumer.commits == [3]


def test_a_topics_consumer_reads_its_assigned_partitions_from_their_positions() -> None:
    topics = Topics(partitions=2)
    for key in (b"a", b"b", b"c", b"d"):
        topics.append("t", key, key, [])
    parts = [TopicPartition("t", 0), TopicPartition("t", 1)]
    consumer = TopicsConsumer(topics)
    consumer.assign(parts)
    consumer.seek(parts[0], 1)
    assert [len(topics.log(tp)) for tp in parts] == [1, 3], "each key on the partition of its crc32"
    assert consumer.poll(timeout_ms=0) == {parts[1]: topics.log(parts[1])} and consumer.poll() == {}
    assert [consumer.position(tp) for tp in parts] == [1, 3]
    consumer.seek_to_end()
    consumer.seek(parts[1], 0)
    assert consumer.poll(max_records=2) == {parts[1]: topics.log(parts[1])[:2]}
    with pytest.raises(IllegalStateError):
        consumer.position(TopicPartition("other", 0))
