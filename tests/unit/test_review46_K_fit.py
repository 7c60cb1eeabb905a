"""Review 46, area K: one rule fits a record to its topic (or dead-letters it as too large), for the stage runner's
outputs (plan_batch) and the desk's decisions (KafkaDeskQueues._fitting) alike: shared/kafka/batch.fit_to_topic."""

from __future__ import annotations

from typing import Any

import pytest
from kafka.consumer.fetcher import ConsumerRecord

from synpref.services.desk import kafka_queue
from synpref.services.desk.kafka_queue import KafkaDeskQueues
from synpref.shared.config import KafkaSettings, TopicSettings
from synpref.shared.kafka import batch
from synpref.shared.kafka.batch import fit_to_topic, plan_batch
from synpref.shared.kafka.codec import (
    DLQ_DROPPED,
    DLQ_KIND,
    DLQ_OFFSET,
    DLQ_REASON,
    DLQ_SERVICE,
    DLQ_TOPIC,
    Message,
    decode_record,
    encode_record,
    header_map,
)
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.stage import StageResult
from synpref.v1.pair_pb2 import PairRecord

TOPICS = TopicSettings()


def record(i: int, text: str = "") -> PairRecord:
    pair = new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": f"good {i}{text}"}],
                    [{"role": "assistant", "content": f"bad {i}"}], source="unit")  # fmt: skip
    return new_record(pair)


def consumed(rec: PairRecord, offset: int) -> ConsumerRecord:
    out = encode_record(rec, TOPICS.review)
    return ConsumerRecord(topic=TOPICS.review, partition=0, leader_epoch=0, offset=offset, timestamp=0,
                          timestamp_type=0, key=out.key, value=out.value, headers=out.headers, checksum=None,
                          serialized_key_size=len(out.key or b""), serialized_value_size=len(out.value),
                          serialized_header_size=0)  # fmt: skip


def fit(rec: PairRecord, limits: dict[str, int], source: Message | None = None) -> tuple[Any, str | None]:
    return fit_to_topic(rec, TOPICS.verified, max_bytes=1 << 20, topic_limits=limits, service="svc",
                        dead_letter_topic=TOPICS.dead_letter, what="the thing", source=source)  # fmt: skip


def test_a_record_within_its_topics_limit_is_its_own_message_and_one_byte_over_is_a_dead_letter() -> None:
    rec = record(1, "x" * 500)
    size = encode_record(rec, TOPICS.verified).size
    message, why = fit(rec, {TOPICS.verified: size})
    assert why is None and message == encode_record(rec, TOPICS.verified)  # exactly at the limit: fits
    letter, why = fit(rec, {TOPICS.verified: size - 1})
    assert why == f"{size} bytes, over the {size - 1}-byte message limit of topic {TOPICS.verified}"
    h = header_map(letter.headers)
    assert letter.topic == TOPICS.dead_letter and (h[DLQ_KIND], h[DLQ_SERVICE]) == ("too-large", "svc")
    assert h[DLQ_REASON] == f"the thing is {why}"
    assert decode_record(letter.value, letter.headers) == rec, "no source message: the record itself"


def test_the_dead_letter_carries_its_source_and_is_cut_to_the_dead_letter_topics_own_limit() -> None:
    rec = record(2, "y" * 3000)
    source = consumed(rec, 7)
    letter, why = fit(rec, {TOPICS.verified: 1000}, source)
    h = header_map(letter.headers)
    assert why is not None and letter.value == source.value and (h[DLQ_TOPIC], h[DLQ_OFFSET]) == (TOPICS.review, "7")
    cut, _ = fit(rec, {TOPICS.verified: 1000, TOPICS.dead_letter: 1500}, source)
    assert cut.value == b"" and cut.size <= 1500 and int(header_map(cut.headers)[DLQ_DROPPED]) > 0


def test_a_topic_with_no_limit_known_takes_any_record() -> None:
    rec = record(3, "z" * 5000)
    message, why = fit_to_topic(rec, "out", max_bytes=None, topic_limits={}, dead_letter_topic="dlq", service="svc",
                                what="x")  # fmt: skip
    assert why is None and message.topic == "out"


def test_the_runner_and_the_desk_both_fit_through_fit_to_topic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, each had its own copy of the size check and the too-large dead letter."""
    calls: list[str] = []

    def spy(rec: PairRecord, topic: str, **kwargs: Any) -> tuple[Any, str | None]:
        calls.append(kwargs["what"])
        return fit_to_topic(rec, topic, **kwargs)

    monkeypatch.setattr(batch, "fit_to_topic", spy)
    monkeypatch.setattr(kafka_queue, "fit_to_topic", spy)
    big = record(4, "w" * 6000)
    plan = plan_batch([consumed(big, 3)], lambda recs: StageResult(routed=[("verified", r) for r in recs]), TOPICS,
                      "svc", max_bytes=4096)  # fmt: skip
    queues = KafkaDeskQueues(KafkaSettings(max_message_bytes=4096), TOPICS, "g")
    letter = queues._fitting(queues.runner, "discarded", big)
    assert calls == ["output for route 'verified'", "the desk's discarded decision"]
    assert plan.failed == {"too-large": 1} and header_map(letter.headers)[DLQ_KIND] == "too-large"
    # Each keeps its own words in the dead letter's reason, as before.
    assert "over the 4096-byte message limit of topic" in header_map(plan.outgoing[0].headers)[DLQ_REASON]
    reason = header_map(letter.headers)[DLQ_REASON]
    assert reason.startswith("the desk's discarded decision is ") and "over the 4096-byte message limit" in reason
