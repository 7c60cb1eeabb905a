"""Review 43, the runner's per-record retry: a slow stage must not retry a batch past max.poll.interval.ms."""

from __future__ import annotations

from typing import Any

from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from synpref.shared.config import KafkaSettings, Settings, TopicSettings
from synpref.shared.kafka.batch import plan_batch
from synpref.shared.kafka.clients import Outbox
from synpref.shared.kafka.codec import DLQ_OFFSET, decode_record, encode_record, header_map
from synpref.shared.kafka.runner import StageRunner
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.stage import StageResult
from synpref.v1.pair_pb2 import PairRecord
from testing.group_consumer import Clock, GroupConsumer, RecordingProducer

TOPICS = TopicSettings(s2_raw="in", s2_annotated="out", dead_letter="dlq")
TP = TopicPartition("in", 0)
POLL_INTERVAL_MS = 100_000
STAGE_CALL_S = 10.0


def record(i: int) -> PairRecord:
    return new_record(new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": f"a{i}"}],
                               [{"role": "assistant", "content": f"b{i}"}], source="unit"))  # fmt: skip


def consumed(offset: int, value: bytes | None = None) -> ConsumerRecord:
    out = encode_record(record(offset), "in")
    value = out.value if value is None else value
    return ConsumerRecord("in", 0, 0, offset, 0, 0, out.key, value, out.headers, None, 0, len(value), 0)


def slow_stage(clock: Clock, poison: set[str], calls: list[int]) -> Any:
    """A judge-like stage: every call takes STAGE_CALL_S of the fake clock; raises on a batch holding a poison pair."""

    def stage(batch: list[PairRecord]) -> StageResult:
        clock.now += STAGE_CALL_S
        calls.append(len(batch))
        if any(r.pair.id in poison for r in batch):
            raise ValueError("the prompt template cannot render this pair")
        return StageResult(routed=[("annotated", r) for r in batch])

    return stage


def test_a_slow_stage_retried_one_record_at_a_time_still_moves_the_partition_on_without_duplicates() -> None:
    # Found in review: after a batch raised, all its records were retried alone with no time limit. 20 calls of 10 s
    # outran a 100 s poll interval: the member was dropped, the commit failed, and the batch was read, retried and
    # its outputs sent again, for ever. (In production: 256 records, a judge's seconds a call, 10 minutes.)
    clock, calls = Clock(), []
    messages = [consumed(i) for i in range(20)]
    consumer, producer = GroupConsumer(messages, clock, TP, POLL_INTERVAL_MS), RecordingProducer()
    stage = slow_stage(clock, {record(3).pair.id}, calls)
    runner = StageRunner(Settings(kafka=KafkaSettings(max_batch=20), topics=TOPICS), stage, service="review43-retry")
    runner.consumer, runner.producer, runner.outbox = consumer, producer, Outbox(producer, 5)
    runner.clock = clock
    for _ in range(6):
        runner.run_once()
    assert consumer.failed_commits == 0, "the member outran max.poll.interval.ms"
    assert consumer.committed == 20, f"stuck at offset {consumer.committed} after {len(calls)} stage calls"
    outputs = [decode_record(v, h).pair.id for topic, v, h in producer.sent if topic == "out"]
    assert sorted(outputs) == sorted(record(i).pair.id for i in range(20) if i != 3), "each output sent once"
    assert [header_map(h)[DLQ_OFFSET] for topic, _, h in producer.sent if topic == "dlq"] == ["3"]


def test_records_past_the_retry_deadline_are_left_to_read_again_not_dead_lettered() -> None:
    clock, calls = Clock(), []
    messages = [consumed(0), consumed(1), consumed(2), consumed(3, b"\xff not protobuf"), consumed(4)]
    stage = slow_stage(clock, {record(1).pair.id}, calls)
    plan = plan_batch(messages, stage, TOPICS, "svc", deadline=25.0, clock=clock)
    # The batch (10 s), then records 0 and 1 alone (20 s, 30 s); past the deadline, 2 and all after it wait.
    assert calls == [4, 1, 1]
    assert [m.offset for m in plan.left] == [2, 3, 4], "the undecodable 3 is read again with the rest"
    assert plan.processed == 2 and plan.failed == {"stage-error": 1} and plan.emitted == {"annotated": 1}
    assert [header_map(o.headers)[DLQ_OFFSET] for o in plan.outgoing if o.topic == "dlq"] == ["1"]


def test_a_batch_that_used_up_the_deadline_still_retries_one_record_so_each_read_progresses() -> None:
    clock, calls = Clock(), []
    messages = [consumed(i) for i in range(3)]
    plan = plan_batch(messages, slow_stage(clock, {record(0).pair.id}, calls), TOPICS, "svc", deadline=5.0,
                      clock=clock)  # fmt: skip
    assert calls == [3, 1] and plan.failed == {"stage-error": 1}
    assert [m.offset for m in plan.left] == [1, 2]
