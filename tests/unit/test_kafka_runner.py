"""The runner's batch logic (decode, stage, route, dead-letter, offsets) without a broker."""

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata, TopicPartition

from synpref.shared.config import TopicSettings
from synpref.shared.kafka.batch import commit_offsets, plan_batch
from synpref.shared.kafka.codec import (
    DLQ_DROPPED,
    DLQ_KIND,
    DLQ_OFFSET,
    DLQ_PARTITION,
    DLQ_REASON,
    DLQ_SERVICE,
    DLQ_TOPIC,
    decode_record,
    encode_record,
    header_map,
)
from synpref.shared.kafka.runner import RunnerStats
from synpref.shared.pairs import new_pair, new_record
from synpref.shared.stage import StageResult, StageUnavailable
from synpref.v1.pair_pb2 import STAGE_ONE, STAGE_TWO, STAGE_UNSPECIFIED, PairRecord

TOPICS = TopicSettings(s2_raw="in", s2_annotated="out-a", review="out-r", dead_letter="dlq")


def pair_record(i: int) -> PairRecord:
    return new_record(
        new_pair(
            [{"role": "user", "content": f"q{i}"}],
            [{"role": "assistant", "content": f"good {i}"}],
            [{"role": "assistant", "content": f"bad {i}"}],
            source="unit",
        )
    )


def message(value: bytes, headers, partition: int = 0, offset: int = 0, key: bytes | None = b"k") -> ConsumerRecord:
    return ConsumerRecord(
        topic="in",
        partition=partition,
        leader_epoch=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        headers=headers,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value),
        serialized_header_size=0,
    )


def encoded(i: int, partition: int = 0, offset: int | None = None) -> ConsumerRecord:
    out = encode_record(pair_record(i), "in")
    return message(out.value, out.headers, partition, i if offset is None else offset, out.key)


def to(route):
    def stage(batch):
        result = StageResult()
        for rec in batch:
            result.emit(route, rec)
        return result

    return stage


def test_a_stage_route_goes_to_the_topic_of_each_records_stage():
    topics = TopicSettings(s1_annotated="s1-a", s2_annotated="s2-a")
    records = []
    for i, stage in enumerate((STAGE_ONE, STAGE_TWO, STAGE_UNSPECIFIED, STAGE_ONE)):
        record = pair_record(i)
        record.lineage.stage = stage
        records.append(record)
    msgs = [
        message(encode_record(r, "in").value, encode_record(r, "in").headers, offset=i) for i, r in enumerate(records)
    ]
    plan = plan_batch(msgs, to("annotated"), topics, "svc")
    # Stage 1 never reaches a Stage-2 topic; a record no controller staged is Stage 2's.
    assert [o.topic for o in plan.outgoing] == ["s1-a", "s2-a", "s2-a", "s1-a"]
    assert topics.topics_of("annotated") == ["s1-a", "s2-a"] and topics.topics_of("review") == [topics.review]


def test_every_decoded_record_goes_to_its_route_in_order():
    msgs = [encoded(i) for i in range(5)]
    plan = plan_batch(msgs, to("annotated"), TOPICS, "svc")
    assert plan.processed == 5 and plan.dead_lettered == 0 and not plan.failed
    assert plan.emitted == {"annotated": 5}
    assert [o.topic for o in plan.outgoing] == ["out-a"] * 5
    ids = [decode_record(o.value, o.headers).pair.id for o in plan.outgoing]
    assert ids == [pair_record(i).pair.id for i in range(5)]
    assert [o.key for o in plan.outgoing] == [i.encode() for i in ids]


def test_undecodable_message_is_dead_lettered_with_its_origin_and_the_rest_goes_on():
    seen = []

    def stage(batch):
        seen.extend(r.pair.id for r in batch)
        return to("annotated")(batch)

    msgs = [encoded(0), message(b"\xff\xff not protobuf", [("synpref-schema", b"v1")], 2, 99, b"bad"), encoded(1)]
    plan = plan_batch(msgs, stage, TOPICS, "svc")
    assert len(seen) == 2
    assert plan.emitted == {"annotated": 2}
    assert plan.failed == {"undecodable": 1} and plan.dead_lettered == 1
    (dlq,) = [o for o in plan.outgoing if o.topic == "dlq"]
    assert (dlq.key, dlq.value) == (b"bad", b"\xff\xff not protobuf")
    h = header_map(dlq.headers)
    assert h[DLQ_KIND] == "undecodable" and "not a synpref.v1.PairRecord protobuf" in h[DLQ_REASON]
    assert (h[DLQ_SERVICE], h[DLQ_TOPIC], h[DLQ_PARTITION], h[DLQ_OFFSET]) == ("svc", "in", "2", "99")


def test_stage_failures_go_to_the_dead_letter_topic_with_the_stage_reason():
    def stage(batch):
        result = StageResult()
        for rec in batch:
            if rec.pair.id == pair_record(1).pair.id:
                result.fail(rec, "judge timed out")
            else:
                result.emit("review", rec)
        return result

    plan = plan_batch([encoded(0), encoded(1, partition=1, offset=7), encoded(2)], stage, TOPICS, "svc")
    assert plan.emitted == {"review": 2} and plan.failed == {"failed": 1}
    (dlq,) = [o for o in plan.outgoing if o.topic == "dlq"]
    h = header_map(dlq.headers)
    assert h[DLQ_REASON] == "judge timed out" and h[DLQ_KIND] == "failed"
    assert (h[DLQ_PARTITION], h[DLQ_OFFSET]) == ("1", "7")
    assert decode_record(dlq.value, dlq.headers).pair.id == pair_record(1).pair.id


def test_a_stage_that_raises_on_every_record_dead_letters_each_with_its_reason():
    def stage(batch):
        raise RuntimeError("model exploded")

    msgs = [encoded(i) for i in range(3)]
    plan = plan_batch(msgs, stage, TOPICS, "svc")
    assert plan.failed == {"stage-error": 3} and plan.dead_lettered == 3 and not plan.emitted
    assert [o.value for o in plan.outgoing] == [m.value for m in msgs]
    assert {header_map(o.headers)[DLQ_REASON] for o in plan.outgoing} == {"stage raised RuntimeError: model exploded"}


def test_a_stage_that_raises_on_a_batch_is_retried_one_record_at_a_time():
    poison = pair_record(2).pair.id
    calls = []

    def stage(batch):
        calls.append(len(batch))
        if any(r.pair.id == poison for r in batch):
            raise ValueError(f"cannot score {poison}")
        return to("annotated")(batch)

    msgs = [encoded(i) for i in range(5)]
    plan = plan_batch(msgs, stage, TOPICS, "svc")
    assert calls == [5, 1, 1, 1, 1, 1]
    assert plan.emitted == {"annotated": 4} and plan.failed == {"stage-error": 1}
    (dlq,) = [o for o in plan.outgoing if o.topic == "dlq"]
    assert dlq.value == msgs[2].value and header_map(dlq.headers)[DLQ_OFFSET] == "2"
    assert header_map(dlq.headers)[DLQ_REASON] == f"stage raised ValueError: cannot score {poison}"
    outputs = [decode_record(o.value, o.headers).pair.id for o in plan.outgoing if o.topic == "out-a"]
    assert outputs == [pair_record(i).pair.id for i in (0, 1, 3, 4)]


def test_a_stage_that_returns_the_wrong_type_counts_as_raising():
    plan = plan_batch([encoded(0)], lambda batch: batch, TOPICS, "svc")
    assert plan.failed == {"stage-error": 1}
    assert "not StageResult" in header_map(plan.outgoing[0].headers)[DLQ_REASON]


def test_an_unknown_route_is_dead_lettered_not_dropped():
    plan = plan_batch([encoded(0)], to("nowhere"), TOPICS, "svc")
    assert plan.failed == {"bad-route": 1} and not plan.emitted
    assert "unknown route 'nowhere'" in header_map(plan.outgoing[0].headers)[DLQ_REASON]


def test_an_output_over_the_message_limit_is_dead_lettered_as_its_input():
    def grow(batch):
        result = StageResult()
        for rec in batch:
            if rec.pair.id == pair_record(1).pair.id:
                rec.pair.meta["blob"] = "x" * 40_000
            result.emit("annotated", rec)
        return result

    msgs = [encoded(0), encoded(1, partition=2, offset=5)]
    plan = plan_batch(msgs, grow, TOPICS, "svc", max_bytes=32 * 1024)
    assert plan.emitted == {"annotated": 1} and plan.failed == {"too-large": 1}
    (dlq,) = [o for o in plan.outgoing if o.topic == "dlq"]
    assert dlq.value == msgs[1].value, "the input, which the broker accepted, not the oversized output"
    h = header_map(dlq.headers)
    assert h[DLQ_KIND] == "too-large" and "over the 32768-byte message limit of topic out-a" in h[DLQ_REASON]
    assert (h[DLQ_PARTITION], h[DLQ_OFFSET]) == ("2", "5")


def test_an_oversized_output_with_no_source_message_is_dead_lettered_not_only_logged():
    # Found in review: a stage that changed the pair id without lineage.original_id left its oversized
    # output with no input to dead-letter; it was logged and its input offset committed: the pair was lost.
    def rename_and_grow(batch):
        result = StageResult()
        for source in batch:
            rec = type(source)()
            rec.CopyFrom(source)  # a new record, as stages that copy make
            rec.pair.id, rec.lineage.original_id = "renamed-" + rec.pair.id, ""
            rec.pair.meta["blob"] = "x" * 40_000
            result.emit("annotated", rec)
        return result

    plan = plan_batch([encoded(0)], rename_and_grow, TOPICS, "svc", max_bytes=32 * 1024)
    assert plan.failed == {"too-large": 1} and plan.dead_lettered == 1 and not plan.emitted
    (dlq,) = [o for o in plan.outgoing if o.topic == "dlq"]
    h = header_map(dlq.headers)
    assert h[DLQ_KIND] == "too-large" and dlq.size <= 32 * 1024


def test_a_dead_letter_over_the_limit_keeps_its_provenance_but_not_its_payload():
    def grow(batch):
        result = StageResult()
        for rec in batch:
            if "blob" in rec.pair.meta:
                rec.pair.meta["blob"] += "x" * 100
            result.emit("annotated", rec)
        return result

    # The input just fits its topic; the output is larger, and so is the input's copy with dead-letter headers.
    big = pair_record(1)
    big.pair.meta["blob"] = "y" * 29_600
    out = encode_record(big, "in")
    msg = message(out.value, out.headers, partition=1, offset=9, key=out.key)
    assert 29_700 < out.size <= 30_000
    limits = {"out-a": 30_000, "dlq": 30_000}
    plan = plan_batch([msg, encoded(0)], grow, TOPICS, "svc", max_bytes=64 * 1024, topic_limits=limits)
    assert plan.failed == {"too-large": 1} and plan.emitted == {"annotated": 1}
    (dlq,) = [o for o in plan.outgoing if o.topic == "dlq"]
    assert dlq.value == b"" and dlq.key == out.key and dlq.size <= 30_000
    h = header_map(dlq.headers)
    assert (h[DLQ_KIND], h[DLQ_TOPIC], h[DLQ_PARTITION], h[DLQ_OFFSET]) == ("too-large", "in", "1", "9")
    assert h[DLQ_DROPPED] == str(len(out.value) + sum(len(v) for _, v in out.headers))
    assert "over the 30000-byte message limit of topic out-a" in h[DLQ_REASON] and "left out" in h[DLQ_REASON]


def test_stage_is_not_called_when_nothing_decodes():
    calls = []
    plan = plan_batch([message(b"x", [])], lambda b: calls.append(b) or StageResult(), TOPICS, "svc")
    assert calls == [] and plan.dead_lettered == 1


def test_commit_offsets_are_one_past_the_last_message_per_partition():
    msgs = [encoded(0, 0, 5), encoded(1, 1, 3), encoded(2, 0, 6), encoded(3, 2, 0)]
    assert commit_offsets(msgs) == {
        TopicPartition("in", 0): OffsetAndMetadata(7, "", -1),
        TopicPartition("in", 1): OffsetAndMetadata(4, "", -1),
        TopicPartition("in", 2): OffsetAndMetadata(1, "", -1),
    }


def test_stats_add_up_batches():
    stats = RunnerStats()
    stats.add(plan_batch([encoded(0), encoded(1)], to("annotated"), TOPICS, "svc"))
    stats.add(plan_batch([message(b"x", [])], to("annotated"), TOPICS, "svc"))
    snap = stats.snapshot()
    assert (snap["processed"], snap["failed"], snap["dead_lettered"], snap["batches"]) == (3, 1, 1, 2)
    assert snap["counters"] == {"emitted.annotated": 2, "failed.undecodable": 1}


def test_revoked_partitions_stop_reporting_lag():
    from synpref.shared.kafka import metrics

    metrics.CONSUMER_LAG.labels("lag-test", "in", "0").set(5)
    metrics.CONSUMER_LAG.labels("lag-test", "in", "1").set(7)
    metrics.forget_lag("lag-test", {TopicPartition("in", 0), TopicPartition("in", 2)})
    assert reported_lag("lag-test") == {"1": 7}


def reported_lag(service: str) -> dict[str, float]:
    from synpref.shared.kafka import metrics

    return {
        sample.labels["partition"]: sample.value
        for family in metrics.CONSUMER_LAG.collect()
        for sample in family.samples
        if sample.labels["service"] == service
    }


@pytest.mark.parametrize("fails_on", ["batch", "one record"])
def test_a_stage_whose_dependency_cannot_serve_fails_the_whole_batch_instead_of_dead_lettering(fails_on):
    msgs = [encoded(i) for i in range(4)]
    bad = pair_record(2).pair.id

    def stage(batch):
        if fails_on == "batch" or any(r.pair.id == bad for r in batch):
            if len(batch) == 1 or fails_on == "batch":
                raise StageUnavailable("the scorer has no model yet")
            raise RuntimeError("a batch error, so the runner retries one record at a time")
        return StageResult(routed=[("annotated", r) for r in batch])

    with pytest.raises(StageUnavailable, match="no model yet"):
        plan_batch(msgs, stage, TOPICS, "unit")
