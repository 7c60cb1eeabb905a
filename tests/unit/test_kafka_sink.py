"""The runner's sink hook and the shared ack and lag helpers, with recording fakes instead of a broker."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from synpref.shared.config import Settings, TopicSettings
from synpref.shared.kafka import metrics
from synpref.shared.kafka.clients import DeliveryError, Outbox, deliver
from synpref.shared.kafka.codec import Outgoing, encode_record
from synpref.shared.kafka.runner import StageRunner
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.stage import StageResult
from synpref.v1.pair_pb2 import PairRecord
from testing.group_consumer import Clock, GroupConsumer, Offsets, RecordingProducer

TOPICS = TopicSettings(s2_raw="in", curated="out", dead_letter="dlq")
TP = TopicPartition("in", 0)


def record(i: int) -> PairRecord:
    pair = new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "a"}],
                    [{"role": "assistant", "content": "b"}], source="unit")  # fmt: skip
    return new_record(pair)


def consumed(i: int, offset: int, value: bytes | None = None) -> ConsumerRecord:
    out = encode_record(record(i), "in")
    value = out.value if value is None else value
    return ConsumerRecord("in", 0, 0, offset, 0, 0, out.key, value, out.headers, None, 0, len(value), 0)


class FakeProducer(RecordingProducer):
    """Fails every send to a topic in `refuse`; each flush goes to `log` with the number of sends so far."""

    def __init__(self, log: list[str], refuse: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__(fail=lambda topic, key: KafkaError("not acknowledged") if topic in self.refuse else None)
        self.log, self.refuse = log, refuse

    def flush(self, timeout: float | None = None) -> None:
        super().flush(timeout)
        self.log.append(f"producer.flush({len(self.sent)})")


class FakeConsumer(GroupConsumer):
    """Hands out `batches`, one a poll; each commit goes to `log` too."""

    def __init__(self, log: list[str], batches: list[list[ConsumerRecord]]) -> None:
        super().__init__([m for batch in batches for m in batch], Clock(), TP, 600_000)
        self.log, self.sizes = log, [len(batch) for batch in batches]

    def poll(
        self, timeout_ms: int = 0, max_records: int | None = None, update_offsets: bool = True
    ) -> dict[TopicPartition, list[ConsumerRecord]]:
        size = self.sizes.pop(0) if self.sizes else 0
        return super().poll(timeout_ms, size if max_records is None else min(size, max_records), update_offsets)

    def commit(self, offsets: Offsets | None = None, timeout_ms: int | None = None) -> None:
        super().commit(offsets, timeout_ms)
        self.log.append("commit " + ",".join(f"{tp.partition}:{o.offset}" for tp, o in (offsets or {}).items()))


class ListSink:
    def __init__(self, log: list[str], keeps_offsets: bool, due_after: int) -> None:
        self.log, self.keeps_offsets, self.due_after = log, keeps_offsets, due_after
        self.buffer: list[str] = []
        self.flushed: list[list[str]] = []

    def write(self, routed: list[tuple[str, PairRecord]]) -> None:
        self.buffer += [r.pair.id for _, r in routed]

    def due(self) -> bool:
        return len(self.buffer) >= self.due_after

    def flush(self, offsets: Mapping[TopicPartition, int]) -> None:
        self.log.append(f"sink.flush {dict((tp.partition, n) for tp, n in offsets.items())}")
        self.flushed.append(self.buffer)
        self.buffer = []

    def stored_offsets(self) -> dict[TopicPartition, int]:
        return {}


def keep_all(batch: list[PairRecord]) -> StageResult:
    result = StageResult()
    for r in batch:
        result.emit("curated", r)
    return result


def runner_with(batches: list[list[ConsumerRecord]], sink: ListSink | None, log: list[str]) -> StageRunner:
    settings = Settings(topics=TOPICS)
    runner = StageRunner(settings, keep_all, service="sink-test", input_route="s2_raw", sink=sink)
    runner.consumer = FakeConsumer(log, batches)
    runner.producer = FakeProducer(log)
    runner.outbox = Outbox(runner.producer, 5)
    return runner


def test_a_sink_gets_the_routed_records_and_is_flushed_before_the_producer_and_the_commit():
    log: list[str] = []
    sink = ListSink(log, keeps_offsets=False, due_after=3)
    garbage = consumed(9, 2, value=b"not a protobuf")
    runner = runner_with([[consumed(0, 0), consumed(1, 1)], [garbage, consumed(2, 3)]], sink, log)
    runner.run_once()
    assert log == [] and sink.buffer == [record(0).pair.id, record(1).pair.id], "not due: nothing flushed"
    runner.run_once()
    assert sink.flushed == [[record(i).pair.id for i in range(3)]]
    assert runner.producer.sent_topics == ["dlq"], "records went to the sink, only the dead letter to Kafka"
    assert log == ["sink.flush {0: 4}", "producer.flush(1)", "commit 0:4"]


def test_a_sink_that_keeps_offsets_is_flushed_after_the_acknowledgements():
    log: list[str] = []
    sink = ListSink(log, keeps_offsets=True, due_after=1)
    runner = runner_with([[consumed(0, 5), consumed(1, 6, value=b"junk")]], sink, log)
    runner.run_once()
    assert log == ["producer.flush(1)", "sink.flush {0: 7}", "commit 0:7"]


def test_an_unacknowledged_dead_letter_stops_the_checkpoint_before_the_sink_and_the_commit():
    log: list[str] = []
    sink = ListSink(log, keeps_offsets=True, due_after=1)
    runner = runner_with([[consumed(0, 0), consumed(1, 1, value=b"junk")]], sink, log)
    runner.producer.refuse = {"dlq"}
    with pytest.raises(DeliveryError):
        runner.run_once()
    assert log == ["producer.flush(1)"] and sink.flushed == []
    with pytest.raises(DeliveryError):  # a swallowed failure (in a rebalance callback) cannot be committed past
        runner.checkpoint()
    assert "commit" not in " ".join(log)


def test_without_a_sink_every_batch_is_checkpointed_and_lag_is_reported():
    log: list[str] = []
    runner = runner_with([[consumed(0, 0), consumed(1, 1)], [consumed(i, i) for i in range(2, 8)]], None, log)
    runner.run_once()
    assert runner.producer.sent_topics == ["out", "out"] and log == ["producer.flush(2)", "commit 0:2"]
    lag = {s.labels["partition"]: s.value for f in metrics.CONSUMER_LAG.collect() for s in f.samples
           if s.labels["service"] == "sink-test"}  # fmt: skip
    assert lag == {"0": 6}


def test_deliver_raises_unless_every_message_is_acknowledged():
    log: list[str] = []
    producer = FakeProducer(log, refuse={"b"})
    assert deliver(producer, [Outgoing("a", None, b"1", [])], 5) == 1
    with pytest.raises(DeliveryError, match="1 of 2 messages not acknowledged"):
        deliver(producer, [Outgoing("a", None, b"1", []), Outgoing("b", None, b"2", [])], 5)
