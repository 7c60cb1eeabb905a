"""Review 39, the Kafka core against the real broker: what a runner may commit, and report, after a failure."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kafka import KafkaConsumer
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.future import Future
from kafka.structs import TopicPartition
from kafka_broker import produce
from prometheus_client import REGISTRY

from synpref.services.desk.kafka_queue import KafkaDeskQueues
from synpref.shared.kafka.clients import DeliveryError, make_producer
from synpref.shared.kafka.runner import StageRunner
from synpref.shared.stage import StageResult, StageUnavailable
from synpref.v1.pair_pb2 import PairRecord
from testing.passthrough import passthrough as passthrough_to
from tests.integration.test_kafka_runner_live import pair_records

pytestmark = pytest.mark.integration


passthrough = passthrough_to("annotated")


def committed(settings: Any, group: str, topic: str) -> int | None:
    consumer = KafkaConsumer(**settings.kafka.client_kwargs(), group_id=group, enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, 0))
    finally:
        consumer.close(autocommit=False)


class Flaky:
    """The runner's real producer, but its first flush (or send) gives up as kafka-python's does after a timeout."""

    def __init__(self, real: Any, fail: str) -> None:
        self.real, self.fail = real, fail

    def _once(self, what: str) -> None:
        if self.fail == what:
            self.fail = ""
            raise KafkaTimeoutError(f"{what}: timed out waiting for the brokers")

    def send(self, *args: Any, **kwargs: Any) -> Any:
        self._once("send")
        return self.real.send(*args, **kwargs)

    def flush(self, timeout: float | None = None) -> None:
        self._once("flush")
        self.real.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        self.real.close(timeout=timeout)


class Refusing:
    """Every message fails, as when the broker refuses it (its topic deleted, say)."""

    def send(self, *args: Any, **kwargs: Any) -> Future:
        return Future().failure(KafkaError("refused by the broker"))

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


def with_producer(runner: StageRunner, producer: Any) -> None:
    runner.producer.close(timeout=5)
    runner.producer = runner.outbox.producer = producer  # type: ignore[union-attr]


def test_a_flush_that_timed_out_is_never_committed_by_a_later_batch(kafka_settings, unique_topics, unique_group):
    # producer.flush raises KafkaTimeoutError with messages still unacknowledged. The outbox dropped their
    # futures without failing for good, so the next batch's flush passed and its commit covered the first batch.
    topics = unique_topics(partitions=1)
    settings = kafka_settings.model_copy(update={"topics": topics})
    produce(settings.kafka, topics.s2_raw, pair_records(5, "stalled"))
    group = unique_group()
    runner = StageRunner(settings, passthrough, service="it-stalled", group_id=group, flush_timeout_s=5)
    runner.open()
    try:
        with_producer(runner, Flaky(make_producer(settings.kafka), "flush"))
        deadline = time.monotonic() + 60
        with pytest.raises(KafkaError):
            while time.monotonic() < deadline:
                runner.run_once()
        produce(settings.kafka, topics.s2_raw, pair_records(3, "after"))
        # A caller that goes on (the desk's next tick) commits nothing. The error is the DeliveryError, or
        # kafka-python's "User rebalance callback throws an error" from it when a rebalance checkpoints first.
        with pytest.raises(KafkaError) as raised:
            while time.monotonic() < deadline:
                runner.run_once()
        assert isinstance(raised.value, DeliveryError) or isinstance(raised.value.__cause__, DeliveryError)
    finally:
        runner.close()
    assert committed(settings, group, topics.s2_raw) is None


def test_a_failed_delivery_is_the_error_reported_and_the_consumer_closes(
    kafka_settings, unique_topics, unique_group, monkeypatch
):
    # KafkaConsumer.close runs the revocation, which checkpointed again: it raised the same DeliveryError and
    # kafka-python raised "User rebalance callback throws an error" in its place, and left its client open.
    topics = unique_topics(partitions=1)
    settings = kafka_settings.model_copy(update={"topics": topics})
    produce(settings.kafka, topics.s2_raw, pair_records(5, "refused"))
    group = unique_group()
    runner = StageRunner(settings, passthrough, service="it-refused", group_id=group, flush_timeout_s=5)
    runner.open()
    client, closed = runner.consumer._client, []
    real_close = client.close
    monkeypatch.setattr(client, "close", lambda *args, **kw: (closed.append(True), real_close(*args, **kw)))
    with_producer(runner, Refusing())
    with pytest.raises(DeliveryError, match="5 of 5 messages not acknowledged"):
        runner.run()
    assert closed, "the consumer's network client was left open"
    assert committed(settings, group, topics.s2_raw) is None


def test_the_desk_reads_again_a_batch_whose_dead_letter_could_not_be_sent(kafka_settings, unique_topics, unique_group):
    # producer.send raises (KafkaTimeoutError after max_block_ms: no metadata for the dead-letter topic, a full
    # buffer) after the poll moved past the batch. The desk logs the tick's error and polls again: the next
    # batch's commit then covered the pairs of the failed one, which never reached the desk.
    topics = unique_topics(partitions=1)
    kafka = kafka_settings.kafka
    garbage = make_producer(kafka)
    garbage.send(topics.review, key=b"junk", value=b"not a protobuf").get(timeout=30)
    garbage.close(timeout=10)
    first, later = pair_records(4, "first"), pair_records(3, "later")
    produce(kafka, topics.review, first)
    group = unique_group()
    queues = KafkaDeskQueues(kafka, topics, group)
    runner = queues._opened()
    with_producer(runner, Flaky(make_producer(kafka), "send"))
    held: list[str] = []
    try:
        deadline = time.monotonic() + 60
        with pytest.raises(KafkaTimeoutError):
            while time.monotonic() < deadline:
                held += [r.pair.id for r, _ in queues._fetch(100)]
        assert held == []
        produce(kafka, topics.review, later)
        want = {r.pair.id for r in first + later}
        while not want <= set(held) and time.monotonic() < deadline:
            held += [r.pair.id for r, _ in queues._fetch(100)]
    finally:
        queues._close()
        queues._executor.shutdown(wait=True)
    assert {r.pair.id for r in first} <= set(held), "the pairs of the failed batch were skipped"
    assert {r.pair.id for r in later} <= set(held)


def unavailable(batch: list[PairRecord]) -> StageResult:
    raise StageUnavailable("the gold model is still being trained")


def run_until_unavailable(runner: StageRunner) -> None:
    deadline = time.monotonic() + 60
    before = runner._unavailable
    while runner._unavailable == before:
        assert time.monotonic() < deadline, "the runner never read the batch"
        runner.run_once()


def test_hours_of_an_unavailable_stage_do_not_overflow_the_pause(kafka_settings, unique_topics, unique_group):
    # The pause was min(30, 2.0 ** (n - 1)): the power overflows at n = 1025, some 8.5 hours of 30 s pauses
    # (a gold scorer waiting for models), and the service died with OverflowError.
    topics = unique_topics(partitions=1)
    settings = kafka_settings.model_copy(update={"topics": topics})
    produce(settings.kafka, topics.s2_raw, pair_records(3, "waiting"))
    stop = threading.Event()
    stop.set()  # the pause returns at once
    runner = StageRunner(settings, unavailable, service="it-waiting", group_id=unique_group(), stop=stop)
    runner.open()
    try:
        runner._unavailable = 1024
        run_until_unavailable(runner)
        run_until_unavailable(runner)  # the batch is read again
    finally:
        runner.close()
    assert committed(settings, runner.group_id, topics.s2_raw) is None


def test_the_lag_goes_on_being_reported_while_the_stage_is_unavailable(kafka_settings, unique_topics, unique_group):
    # Only a batch that went through reported the lag: while the dependency was down the gauge kept its last
    # value (none here, 0 in a service that had caught up) however far behind the input topic got.
    topics = unique_topics(partitions=1)
    settings = kafka_settings.model_copy(update={"topics": topics})
    produce(settings.kafka, topics.s2_raw, pair_records(7, "behind"))
    stop = threading.Event()
    stop.set()
    runner = StageRunner(settings, unavailable, service="it-behind", group_id=unique_group(), stop=stop)
    runner.open()
    try:
        run_until_unavailable(runner)
        labels = {"service": "it-behind", "topic": topics.s2_raw, "partition": "0"}
        assert REGISTRY.get_sample_value("synpref_runner_consumer_lag", labels) == 7
    finally:
        runner.close()
