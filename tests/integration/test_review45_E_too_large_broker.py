"""Review 45, area E, against the real broker: an output the broker refuses as too large is dead-lettered.

Two ways the runner's known limit is above the topic's: it could not read max.message.bytes (no DescribeConfigs
permission, played by message_limits raising), or an operator lowered it after the runner opened. Before the fix
the refusal stopped the runner uncommitted, and a restart was refused the same batch again, for ever.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kafka import KafkaConsumer
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError
from kafka.structs import TopicPartition
from kafka_broker import produce, read_topic

from synpref.shared.kafka import runner as runner_module
from synpref.shared.kafka.clients import make_admin
from synpref.shared.kafka.codec import DLQ_KIND, DLQ_OFFSET, decode_record, encode_record, header_map
from synpref.shared.kafka.runner import StageRunner
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord
from testing.passthrough import passthrough

pytestmark = pytest.mark.integration

LIMIT = 20_000
BIG = 2


def records(n: int) -> list[PairRecord]:
    return [new_record(new_pair([{"role": "user", "content": f"q{i} " + ("x" * 60_000 if i == BIG else "")}],
                                [{"role": "assistant", "content": "good"}], [{"role": "assistant", "content": "bad"}],
                                source="it")) for i in range(n)]  # fmt: skip


def set_limit(kafka: Any, topic: str, limit: int) -> None:
    admin = make_admin(kafka)
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs={"max.message.bytes": str(limit)})
        assert admin.alter_configs([resource]).get("topic", {}).get(topic) == "OK"
    finally:
        admin.close()


def committed(kafka: Any, group: str, topic: str) -> int | None:
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=group, enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, 0))
    finally:
        consumer.close(autocommit=False)


@pytest.mark.parametrize("case", ["unreadable", "lowered"])
def test_an_output_the_broker_refuses_is_dead_lettered_and_the_partition_goes_on(
    case: str, kafka_settings: Any, unique_topics: Any, unique_group: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = unique_topics()
    kafka = kafka_settings.kafka.model_copy(update={"max_batch": 10})
    settings = kafka_settings.model_copy(update={"topics": topics, "kafka": kafka})
    group = unique_group()
    if case == "unreadable":
        set_limit(kafka, topics.s2_annotated, LIMIT)

        def refused(*args: Any, **kwargs: Any) -> dict[str, int]:
            raise KafkaError("TopicAuthorizationFailedError: no DescribeConfigs permission")

        monkeypatch.setattr(runner_module, "message_limits", refused)
    runner = StageRunner(settings, passthrough("annotated"), service="review45-e-live", group_id=group,
                         flush_timeout_s=30)  # fmt: skip
    runner.open()
    assert runner.topic_limits == {}, "the runner believes kafka.max_message_bytes"
    if case == "lowered":
        set_limit(kafka, topics.s2_annotated, LIMIT)
    sent = records(6)
    produce(kafka, topics.s2_raw, sent)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 90
    while thread.is_alive() and time.monotonic() < deadline and committed(kafka, group, topics.s2_raw) != 6:
        time.sleep(0.3)
    runner.stop.set()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert committed(kafka, group, topics.s2_raw) == 6, "the runner stopped on the refusal (the old crash loop)"
    outputs = [decode_record(m.value, m.headers).pair.id for m in read_topic(kafka, topics.s2_annotated)]
    assert set(outputs) == {r.pair.id for i, r in enumerate(sent) if i != BIG}, "the others delivered, some twice"
    (letter,) = [header_map(m.headers) for m in read_topic(kafka, topics.dead_letter)]
    assert (letter[DLQ_KIND], letter[DLQ_OFFSET]) == ("too-large", str(BIG))
    big = encode_record(sent[BIG], topics.s2_annotated).size
    # Read back from the broker where it can; otherwise one byte under the refused message.
    assert runner.topic_limits == {topics.s2_annotated: LIMIT if case == "lowered" else big - 1}
