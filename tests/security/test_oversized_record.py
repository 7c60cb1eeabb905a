"""Issue 12, item 1: a record near the broker's size limit must not crash-loop a stage.

A 1,048,300-byte record on the scored topic is accepted by a topic that has the broker's
default limit (1 MiB). The filter's output for it, and its dead-letter copy with ~300
bytes of headers, are not: before the fix the refusal was fatal, so the filter exited 1
on every restart and re-emitted the valid record ahead of it each time.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.structs import TopicPartition
from kafka_broker import produce, read_topic, unique_name
from synpref_procs import Proc, watch_alive, write_config

from synpref.shared.config import TopicSettings
from synpref.shared.kafka.admin import ensure_topics
from synpref.shared.kafka.codec import (
    DLQ_DROPPED,
    DLQ_KIND,
    DLQ_OFFSET,
    DLQ_REASON,
    DLQ_TOPIC,
    decode_record,
    header_map,
)
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PREFERENCE_CHOSEN, ModelScore, PairRecord

pytestmark = pytest.mark.integration

BROKER_DEFAULT_LIMIT = 1_048_588  # Kafka's message.max.bytes default, which a topic without max.message.bytes keeps
NEAR_LIMIT = 1_048_300
CONFIGURED_LIMIT = 8 * 1024 * 1024  # kafka.max_message_bytes default


def keepable(i: int, size: int | None = None) -> PairRecord:
    """A scored pair the stage-2 filter keeps; `size` pads it to exactly that many serialized bytes."""
    record = new_record(
        new_pair(
            [{"role": "user", "content": f"question {i}"}],
            [{"role": "assistant", "content": f"good {i}"}],
            [{"role": "assistant", "content": f"bad {i}"}],
            source="security",
        )
    )
    record.scores.append(ModelScore(model="gold", version="g", reward_chosen=2.0, reward_rejected=0.0, p=0.88))
    record.judge_aggregate.preference = PREFERENCE_CHOSEN
    if size is not None:
        record.pair.meta["blob"] = ""
        record.pair.meta["blob"] = "x" * (size - record.ByteSize())
        while record.ByteSize() > size:  # the length prefix of the blob grew by a byte or two
            record.pair.meta["blob"] = record.pair.meta["blob"][:-1]
        assert record.ByteSize() == size
    return record


def topic_limits(bootstrap: str, names: list[str]) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, name, configs=["max.message.bytes"]) for name in names]
        found = admin.describe_configs(resources, config_filter="all")["topic"]
    finally:
        admin.close()
    return {name: int(found[name]["max.message.bytes"]["value"]) for name in names}


def test_synpref_topics_creates_topics_with_the_configured_message_limit(kafka_settings: Any, tmp_path: Any) -> None:
    base = unique_name("t-sec-limit")
    topics = TopicSettings(**{route: f"{base}.{route}" for route in TopicSettings.model_fields})
    config = write_config(tmp_path / "config.yaml", kafka_settings.kafka.bootstrap_servers, topics)
    done = subprocess.run([sys.executable, "-m", "synpref.shared.cli", "topics", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    limits = topic_limits(kafka_settings.kafka.bootstrap_servers, topics.all())
    assert limits == {name: CONFIGURED_LIMIT for name in topics.all()}


def test_a_record_near_the_topic_limit_fails_alone_and_the_filter_keeps_running(
    kafka_settings: Any, unique_group: Any, tmp_path: Any
) -> None:
    kafka = kafka_settings.kafka
    base = unique_name("t-sec-near")
    topics = TopicSettings(**{route: f"{base}.{route}" for route in TopicSettings.model_fields})
    # Topics as an older `synpref topics` (or broker auto-creation) left them: the broker's 1 MiB limit.
    ensure_topics(kafka, topics.all(), partitions=1, replication_factor=1,
                  configs={"max.message.bytes": str(BROKER_DEFAULT_LIMIT)})  # fmt: skip
    before, big, after = keepable(0), keepable(1, size=NEAR_LIMIT), keepable(2)
    assert produce(kafka, topics.s2_annotated, [before, big, after]) == 3  # the broker accepts all three
    group = unique_group()
    config = write_config(tmp_path / "config.yaml", kafka.bootstrap_servers, topics,
                          service={"group_id": group}, filter={"stage": 2})  # fmt: skip
    filt = Proc("filter", ["filter", "--by-decision"], config, tmp_path).start()
    try:
        filt.wait_ready()
        curated: list = []
        dead: list = []

        def settled() -> bool:
            curated[:] = read_topic(kafka, topics.curated)
            dead[:] = read_topic(kafka, topics.dead_letter)
            return len(curated) >= 2 and len(dead) >= 1 and committed(kafka, group, topics.s2_annotated) == 3

        watch_alive(filt, settled, 90, "both valid pairs curated, the big one dead-lettered, and offsets committed")
        assert sorted(decode_record(m.value, m.headers).pair.id for m in curated) == sorted(
            [before.pair.id, after.pair.id]
        ), "each valid pair exactly once"
        (entry,) = dead
        headers = header_map(entry.headers)
        assert headers[DLQ_KIND] == "too-large" and "left out" in headers[DLQ_REASON]
        assert int(headers[DLQ_DROPPED]) >= NEAR_LIMIT
        assert (headers[DLQ_TOPIC], headers[DLQ_OFFSET]) == (topics.s2_annotated, "1")
        assert entry.key == big.pair.id.encode()
        assert len(entry.value) < 64 * 1024, "the dead-letter entry keeps the reason, not the oversized payload"
    finally:
        code = filt.stop()
    assert code == 0, filt.text()[-3000:]


def committed(kafka: Any, group: str, topic: str) -> int | None:
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=group, enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, 0))
    finally:
        consumer.close(autocommit=False)
