"""StageRunner in-process against the real broker: routing, dead letters, commits, stop."""

import threading
import time

import pytest
from kafka import KafkaConsumer
from kafka.structs import TopicPartition
from kafka_broker import produce, read_topic, topic_size
from prometheus_client import REGISTRY

from synpref.shared.kafka.clients import make_producer, poll_group
from synpref.shared.kafka.codec import DLQ_KIND, DLQ_REASON, DLQ_TOPIC, decode_record, header_map
from synpref.shared.kafka.runner import StageRunner
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.stage import StageResult

pytestmark = pytest.mark.integration


def pair_records(n, tag=""):
    return [
        new_record(
            new_pair(
                [{"role": "user", "content": f"{tag} question {i}"}],
                [{"role": "assistant", "content": "better"}],
                [{"role": "assistant", "content": "worse"}],
                source="it",
                meta={"i": str(i)},
            )
        )
        for i in range(n)
    ]


def run_until(runner, done, timeout_s=60.0):
    """Run the runner in a thread until done() is true, then stop it and wait for it to close."""
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.1)
    runner.stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive(), "runner did not stop within 30 s of the stop event"
    assert done(), f"condition not met within {timeout_s} s"


def committed(settings, group, topic, partitions):
    consumer = KafkaConsumer(**settings.kafka.client_kwargs(), group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close(autocommit=False)


def test_routes_failures_and_a_raising_stage_while_going_on(kafka_settings, unique_topics, unique_group):
    topics = unique_topics(partitions=3)
    settings = kafka_settings.model_copy(
        update={"topics": topics, "kafka": kafka_settings.kafka.model_copy(update={"max_batch": 20})}
    )
    records = pair_records(300)
    bomb, rejected = records[150].pair.id, records[42].pair.id

    def stage(batch):
        if any(r.pair.id == bomb for r in batch):
            raise RuntimeError("bomb in batch")
        result = StageResult()
        for r in batch:
            if r.pair.id == rejected:
                result.fail(r, "rejected by the stage")
            else:
                result.emit("review" if int(r.pair.meta["i"]) % 2 else "annotated", r)
        return result

    produce(settings.kafka, topics.s2_raw, records[:200])
    producer = make_producer(settings.kafka)
    producer.send(topics.s2_raw, key=b"junk", value=b"\x08\x96\x01 not a record", headers=[("synpref-schema", b"v1")])
    producer.flush(timeout=30)
    produce(settings.kafka, topics.s2_raw, records[200:], producer=producer)
    producer.close(timeout=10)

    group = unique_group()
    runner = StageRunner(settings, stage, service="it-runner", group_id=group)
    total = len(records) + 1
    run_until(runner, lambda: runner.stats.snapshot()["processed"] >= total)

    annotated = {decode_record(m.value, m.headers).pair.id for m in read_topic(settings.kafka, topics.s2_annotated)}
    review = {decode_record(m.value, m.headers).pair.id for m in read_topic(settings.kafka, topics.review)}
    dlq = read_topic(settings.kafka, topics.dead_letter)
    kinds = [header_map(m.headers)[DLQ_KIND] for m in dlq]
    # The batch holding the bomb went to the dead-letter topic whole; everything else went on.
    stage_errors = {m.key.decode() for m in dlq if header_map(m.headers)[DLQ_KIND] == "stage-error"}
    assert bomb in stage_errors
    assert kinds.count("undecodable") == 1 and kinds.count("failed") == (0 if rejected in stage_errors else 1)
    junk = next(m for m in dlq if m.key == b"junk")
    assert header_map(junk.headers)[DLQ_TOPIC] == topics.s2_raw
    assert "not a synpref.v1.PairRecord protobuf" in header_map(junk.headers)[DLQ_REASON]
    everything = annotated | review | stage_errors | ({rejected} if "failed" in kinds else set())
    assert everything == {r.pair.id for r in records}
    assert not annotated & review
    # Offsets were committed up to the end of every partition, and nothing was re-read.
    ends = KafkaConsumer(**settings.kafka.client_kwargs(), group_id=None)
    try:
        parts = [TopicPartition(topics.s2_raw, p) for p in range(3)]
        end_offsets = {tp.partition: off for tp, off in ends.end_offsets(parts).items()}
    finally:
        ends.close()
    assert committed(settings, group, topics.s2_raw, 3) == end_offsets
    assert runner.stats.snapshot()["processed"] == total
    # The same counts reach Prometheus.
    sample = REGISTRY.get_sample_value
    assert sample("synpref_runner_processed_records_total", {"service": "it-runner"}) == total
    assert sample("synpref_runner_failed_records_total", {"service": "it-runner", "kind": "undecodable"}) == 1
    assert sample("synpref_runner_dead_lettered_records_total", {"service": "it-runner"}) == len(dlq)
    emitted = sample("synpref_runner_emitted_records_total", {"service": "it-runner", "route": "annotated"})
    assert emitted == len(annotated)


def test_a_restarted_runner_resumes_after_its_last_commit(kafka_settings, unique_topics, unique_group):
    topics = unique_topics(partitions=1)
    settings = kafka_settings.model_copy(
        update={"topics": topics, "kafka": kafka_settings.kafka.model_copy(update={"max_batch": 50})}
    )
    records = pair_records(400, "resume")
    produce(settings.kafka, topics.s2_raw, records)
    group = unique_group()

    def passthrough(batch):
        result = StageResult()
        for r in batch:
            result.emit("annotated", r)
        return result

    first = StageRunner(settings, passthrough, service="it-resume", group_id=group)
    first.open()
    handled = sum(first.run_once() for _ in range(40) if first.stats.snapshot()["processed"] < 120)
    first.close()
    assert 120 <= handled < 400
    assert committed(settings, group, topics.s2_raw, 1) == {0: handled}

    second = StageRunner(settings, passthrough, service="it-resume", group_id=group)
    run_until(second, lambda: second.stats.snapshot()["processed"] >= 400 - handled)
    assert second.stats.snapshot()["processed"] == 400 - handled
    out = read_topic(settings.kafka, topics.s2_annotated, 400)
    assert [decode_record(m.value, m.headers).pair.id for m in out] == [r.pair.id for r in records]
    assert topic_size(settings.kafka, topics.s2_annotated) == 400


class HoldingSink:
    """Keeps everything until a checkpoint: its offsets stay pending between batches, as the writer's do."""

    keeps_offsets = False

    def __init__(self) -> None:
        self.rows: list[str] = []
        self.flushed: list[int] = []

    def write(self, routed):
        self.rows += [r.pair.id for _, r in routed]

    def due(self) -> bool:
        return False

    def flush(self, offsets):
        self.flushed.append(len(self.rows))
        return None


def test_a_rebalance_with_buffered_offsets_checkpoints_instead_of_crashing(kafka_settings, unique_topics, unique_group):
    # kafka-python 3 runs the rebalance listener on the consumer's IO thread, where a blocking commit
    # raises: a writer whose sink held offsets crashed ("User rebalance callback throws an error")
    # when another member joined its group.
    topics = unique_topics(partitions=2)
    settings = kafka_settings.model_copy(update={"topics": topics})
    produce(settings.kafka, topics.s2_raw, pair_records(40, "rebalance"))
    group, sink = unique_group(), HoldingSink()

    def passthrough(batch):
        result = StageResult()
        for r in batch:
            result.emit("annotated", r)
        return result

    runner = StageRunner(settings, passthrough, service="it-rebalance", group_id=group, sink=sink)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while runner.stats.snapshot()["processed"] < 40 and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.1)
    assert runner.stats.snapshot()["processed"] == 40 and sink.flushed == []
    joiner = KafkaConsumer(topics.s2_raw, **settings.kafka.client_kwargs(), group_id=group, enable_auto_commit=False)
    try:
        deadline = time.monotonic() + 60
        while not sink.flushed and time.monotonic() < deadline and thread.is_alive():
            poll_group(joiner, timeout_ms=200)
        assert thread.is_alive(), "the runner died in the rebalance"
        assert sink.flushed == [40]  # the revocation checkpointed what the sink held
        while sum(v or 0 for v in committed(settings, group, topics.s2_raw, 2).values()) < 40:
            assert time.monotonic() < deadline, committed(settings, group, topics.s2_raw, 2)
            poll_group(joiner, timeout_ms=200)
    finally:
        joiner.close(autocommit=False)
        runner.stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
