"""The Kafka broker of a test session, and helpers for tests that talk to it.

The broker is a real single-node Apache Kafka (LocalKafka) unless
SYNPREF_KAFKA_BOOTSTRAP names another cluster; see tests/conftest.py for the fixtures.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from synpref.shared.config import KafkaSettings, TopicSettings
from synpref.shared.kafka.admin import ensure_topics
from synpref.shared.kafka.clients import make_admin, make_producer
from synpref.shared.kafka.codec import encode_record
from synpref.v1.pair_pb2 import PairRecord
from testing.local_kafka import LocalKafka

EXTERNAL_ENV = "SYNPREF_KAFKA_BOOTSTRAP"  # also read by tests/conftest.py


class Broker:
    """Started on first use, stopped at the end of the session."""

    def __init__(self) -> None:
        self.local: LocalKafka | None = None
        self.bootstrap = ""
        self.description = ""

    def start(self) -> str:
        if self.bootstrap:
            return self.bootstrap
        external = os.environ.get(EXTERNAL_ENV, "").strip()
        if external:
            self.bootstrap = external
            self.description = f"external Kafka cluster at {external} ({EXTERNAL_ENV}), {cluster_summary(external)}"
        else:
            self.local = LocalKafka().start()
            self.bootstrap = self.local.bootstrap_servers
            self.description = self.local.describe()
        return self.bootstrap

    def stop(self) -> None:
        if self.local is not None:
            self.local.stop()


def cluster_summary(bootstrap: str) -> str:
    """How many brokers the cluster reports (Kafka has no version API; its ApiVersions only bound it)."""
    admin = make_admin(KafkaSettings(bootstrap_servers=bootstrap))
    try:
        return f"{len(admin.describe_cluster()['brokers'])} broker(s)"
    finally:
        admin.close()


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_unique_topics(kafka: KafkaSettings, label: str, partitions: int = 1) -> TopicSettings:
    """A TopicSettings with a fresh name for every route, each created with `partitions` partitions."""
    base = unique_name(f"t-{label}"[:60])
    topics = TopicSettings(**{route: f"{base}.{route}" for route in TopicSettings.model_fields})
    ensure_topics(kafka, topics.all(), partitions=partitions, replication_factor=1)
    return topics


def produce(
    kafka: KafkaSettings, topic: str, records: Iterable[PairRecord], producer: KafkaProducer | None = None
) -> int:
    """Send records as the pipeline would (encode_record) and wait for every ack."""
    own = producer is None
    producer = producer or make_producer(kafka)
    try:
        futures = []
        for record in records:
            out = encode_record(record, topic)
            futures.append(producer.send(out.topic, key=out.key, value=out.value, headers=out.headers))
        producer.flush(timeout=60)
        for future in futures:
            future.get(timeout=0)
        return len(futures)
    finally:
        if own:
            producer.close(timeout=10)


def read_topic(kafka: KafkaSettings, topic: str, expect: int | None = None, timeout_s: float = 60.0) -> list:
    """Messages of `topic` from the beginning, without a consumer group (assign + seek).

    expect=None reads up to the end offsets the topic has when called; expect=N waits
    until N messages arrived (for outputs still being written). Either way at most timeout_s.
    """
    consumer = KafkaConsumer(**kafka.client_kwargs(), enable_auto_commit=False, group_id=None)
    try:
        assigned = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        ends = consumer.end_offsets(assigned)
        out: list = []

        def done() -> bool:
            if expect is not None:
                return len(out) >= expect
            return all(consumer.position(tp) >= end for tp, end in ends.items())

        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200, max_records=5000).values():
                out.extend(batch)
        return out
    finally:
        consumer.close(autocommit=False)


def topic_size(kafka: KafkaSettings, topic: str) -> int:
    """Messages in the topic (sum of end offsets; compaction and deletes aside)."""
    consumer = KafkaConsumer(**kafka.client_kwargs(), enable_auto_commit=False, group_id=None)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum(consumer.end_offsets(parts).values()) if parts else 0
    finally:
        consumer.close(autocommit=False)


def committed_to_end(kafka: KafkaSettings, group: str, topic: str) -> bool:
    """Whether `group` has committed, on every partition of `topic`, the offset at its end: it consumed it all."""
    consumer = KafkaConsumer(**kafka.client_kwargs(), enable_auto_commit=False, group_id=None)
    admin = make_admin(kafka)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = consumer.end_offsets(parts)
        committed = admin.list_group_offsets({group: parts}).get(group, {})
        return bool(parts) and all(tp in committed and committed[tp].offset >= end for tp, end in ends.items())
    finally:
        admin.close()
        consumer.close(autocommit=False)
