"""Review 45, area E: a message the broker refuses as too large must not stall its partition.

When the runner could not read a topic's max.message.bytes (no DescribeConfigs permission), or an operator lowered
it while the service ran, plan_batch let through an output the broker then refused (MessageSizeTooLargeError): the
Outbox raised DeliveryError, the service exited, and after the restart the same batch was refused again, for ever.
The runner now takes a limit under the refused size for that topic, opens a fresh producer and reads the batch
again, so that the record is dead-lettered (too-large) and the rest delivered; a timeout still stops it as before.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, KafkaTimeoutError, RecordListTooLargeError, UnknownError
from kafka.structs import TopicPartition

from synpref.shared.config import KafkaSettings, Settings, TopicSettings
from synpref.shared.kafka import runner as runner_module
from synpref.shared.kafka.batch import learned_limit
from synpref.shared.kafka.clients import DeliveryError, Outbox
from synpref.shared.kafka.codec import DLQ_KIND, DLQ_OFFSET, Outgoing, decode_record, encode_record, header_map
from synpref.shared.kafka.runner import MAX_REFUSED_READS, StageRunner
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord
from testing.group_consumer import Broker, Clock, GroupConsumer, LimitedProducer, Offsets
from testing.passthrough import passthrough

TOPICS = TopicSettings(s2_raw="in", s2_annotated="out", dead_letter="dlq")
TP = TopicPartition("in", 0)
BIG = 2  # the offset whose record is too large for the broker's "out"


def record(i: int, chars: int = 10) -> PairRecord:
    return new_record(new_pair([{"role": "user", "content": f"q{i}" + "x" * chars}],
                               [{"role": "assistant", "content": f"a{i}"}],
                               [{"role": "assistant", "content": f"b{i}"}], source="unit"))  # fmt: skip


def records(n: int) -> list[PairRecord]:
    return [record(i, 3000 if i == BIG else 10) for i in range(n)]


def consumed(rec: PairRecord, offset: int) -> ConsumerRecord:
    out = encode_record(rec, "in")
    return ConsumerRecord("in", 0, 0, offset, 0, 0, out.key, out.value, out.headers, None, 0, len(out.value), 0)


class Consumer(GroupConsumer):
    """One partition; the runner is stopped once a poll finds nothing left."""

    def __init__(self, messages: list[ConsumerRecord], stop: threading.Event, broker: Broker) -> None:
        super().__init__(messages, Clock(), TP, 600_000)
        self.stop, self.broker, self.closed = stop, broker, False
        self.reads: list[list[int]] = []

    def poll(
        self, timeout_ms: int = 0, max_records: int | None = None, update_offsets: bool = True
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        polled = super().poll(timeout_ms, max_records, update_offsets)
        self.reads.append([m.offset for m in polled.get(TP, [])])
        if not polled:
            self.stop.set()
        return polled

    def commit(self, offsets: Offsets | None = None, timeout_ms: int | None = None) -> None:
        super().commit(offsets, timeout_ms)
        self.broker.events.append(("commit", self.committed))

    def close(self, autocommit: bool = True, timeout_ms: int | None = None) -> None:
        self.closed = True


def stage_runner(
    monkeypatch: pytest.MonkeyPatch, broker: Broker, n: int, readable: dict[str, int] | None = None
) -> tuple[StageRunner, Consumer, list[LimitedProducer]]:
    """A runner on the fakes: `readable` is what DescribeConfigs answers, None when it is refused."""
    stop = threading.Event()
    settings = Settings(kafka=KafkaSettings(max_batch=4), topics=TOPICS)
    runner = StageRunner(settings, passthrough("annotated"), service="review45-e", stop=stop)
    consumer = Consumer([consumed(rec, i) for i, rec in enumerate(records(n))], stop, broker)
    producers = [LimitedProducer(broker)]
    runner.consumer, runner.producer, runner.outbox = consumer, producers[0], Outbox(producers[0], 5)

    def make_producer(kafka: KafkaSettings, **overrides: Any) -> LimitedProducer:
        producers.append(LimitedProducer(broker))
        return producers[-1]

    def message_limits(kafka: KafkaSettings, topics: Any, timeout_s: float) -> dict[str, int]:
        if readable is None:
            raise KafkaError("TopicAuthorizationFailedError: no DescribeConfigs")
        return readable

    monkeypatch.setattr(runner_module, "make_producer", make_producer)
    monkeypatch.setattr(runner_module, "message_limits", message_limits)
    return runner, consumer, producers


def test_a_refused_output_is_dead_lettered_and_the_rest_delivered_then_committed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Broker({"out": 2000})
    runner, consumer, producers = stage_runner(monkeypatch, broker, 6)
    with caplog.at_level(logging.WARNING, logger="synpref.shared.kafka.runner"):
        runner.run()  # old code: DeliveryError here, and again after every restart
    big = encode_record(records(6)[BIG], "out")
    assert runner.topic_limits == {"out": big.size - 1}, "a limit under the refused message's size"
    learned = [r.getMessage() for r in caplog.records if "refused a" in r.getMessage()]
    assert len(learned) == 1 and f"its limit is taken as {big.size - 1} bytes" in learned[0]
    # The first batch was read again on a fresh producer; the old one, failed for good, is closed.
    assert consumer.reads == [[0, 1, 2, 3], [0, 1, 2, 3], [4, 5], []]
    assert len(producers) == 2 and producers[0].closed and producers[1].closed
    outputs = {decode_record(v, h).pair.id for topic, v, h in broker.acked if topic == "out"}
    assert outputs == {rec.pair.id for i, rec in enumerate(records(6)) if i != BIG}
    letters = [header_map(h) for topic, _, h in broker.acked if topic == "dlq"]
    assert [(d[DLQ_KIND], d[DLQ_OFFSET]) for d in letters] == [("too-large", str(BIG))]
    # Committed once per batch, each only after all of its messages (the dead letter included) were acknowledged.
    assert [e for e in broker.events if e[0] == "commit"] == [("commit", 4), ("commit", 6)]
    first_commit = broker.events.index(("commit", 4))
    assert ("ack", "dlq") in broker.events[:first_commit] and consumer.committed == 6
    assert runner.stats.snapshot()["processed"] == 6, "the refused read is not counted"


def test_the_limit_the_broker_reports_when_readable_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = Broker({"out": 1000}, refusal=RecordListTooLargeError)
    runner, consumer, _ = stage_runner(monkeypatch, broker, 3, readable={"out": 1000, "dlq": 16 << 20})
    runner.run()
    # The broker's figure replaces the guess from the refusal; one over kafka.max_message_bytes changes nothing.
    assert runner.topic_limits == {"out": 1000} and consumer.committed == 3
    assert [header_map(h)[DLQ_KIND] for topic, _, h in broker.acked if topic == "dlq"] == ["too-large"]


def test_a_delivery_that_timed_out_still_stops_the_runner_uncommitted(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = Broker({"out": 2000})
    broker.error = KafkaTimeoutError("Batch for TopicPartition(topic='out') expired")
    runner, consumer, producers = stage_runner(monkeypatch, broker, 6)
    with pytest.raises(DeliveryError, match="KafkaTimeoutError"):
        runner.run()
    assert consumer.committed == 0 and consumer.closed and len(producers) == 1 and runner.topic_limits == {}


def test_a_refusal_no_lower_limit_can_fix_stops_the_runner_uncommitted(monkeypatch: pytest.MonkeyPatch) -> None:
    # A dead-letter topic that takes less than a dead letter's provenance: however much is cut, it is refused.
    broker = Broker({"out": 2000, "dlq": 40})
    runner, consumer, _ = stage_runner(monkeypatch, broker, 6)
    with pytest.raises(DeliveryError, match="MessageSizeTooLargeError"):
        runner.run()
    assert consumer.committed == 0 and consumer.closed
    assert 2 < len(consumer.reads) <= MAX_REFUSED_READS + 1, "read again a bounded number of times"


@pytest.mark.parametrize("flush_error", [None, UnknownError("Future not done")])
def test_the_outbox_names_the_message_refused_first_not_those_aborted_after_it(flush_error: KafkaError | None) -> None:
    broker = Broker({"out": 200})
    small, big = Outgoing("out", b"k", b"v" * 10, []), Outgoing("out", b"k", b"v" * 300, [])
    outbox = Outbox(LimitedProducer(broker, flush_error), 5)
    outbox.send([small, big, small])  # old code: no too_large; by send order it would have been the small one
    with pytest.raises(DeliveryError) as raised:
        outbox.flush()
    assert raised.value.too_large == ("out", big.size)


def test_the_outbox_names_no_refusal_when_the_first_failure_was_a_timeout() -> None:
    broker = Broker({"out": 200})
    broker.error = KafkaTimeoutError("expired")
    outbox = Outbox(LimitedProducer(broker), 5)
    outbox.send([Outgoing("out", b"k", b"v" * 300, [])])
    with pytest.raises(DeliveryError) as raised:
        outbox.flush()
    assert raised.value.too_large is None


def test_a_learned_limit_is_a_byte_under_the_refusal_and_none_past_the_known_limit() -> None:
    assert learned_limit({}, 1000, "out", 700) == 699
    assert learned_limit({"out": 600}, 1000, "out", 500) == 499
    assert learned_limit({"out": 600}, 1000, "out", 700) is None, "plan_batch let it through over the limit: no help"
    assert learned_limit({}, 1000, "out", 1001) is None


def test_a_flush_that_kafka_python_cut_short_on_a_split_waits_for_the_split_batches() -> None:
    # kafka-python 3.0.12's flush raises "Future not done" once it splits a batch; the split halves may all pass.
    broker = Broker({"out": 200})
    outbox = Outbox(LimitedProducer(broker, UnknownError("Future not done")), 5)
    outbox.send([Outgoing("out", b"k", b"v" * 10, [])] * 3)
    assert outbox.flush() == 3 and len(broker.acked) == 3  # old code: DeliveryError, the service exited
