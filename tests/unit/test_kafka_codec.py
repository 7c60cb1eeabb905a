"""Payload codec: round trips, schema header checks, dead-letter headers."""

import pytest

from synpref.shared.kafka.codec import (
    DLQ_KIND,
    DLQ_OFFSET,
    DLQ_PARTITION,
    DLQ_REASON,
    DLQ_SERVICE,
    DLQ_TOPIC,
    MAX_REASON_CHARS,
    RECORD_TYPE,
    SCHEMA_HEADER,
    TYPE_HEADER,
    PayloadError,
    dead_letter,
    decode_record,
    encode_record,
    header_map,
)
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import ModelScore


def record(i: int = 0):
    rec = new_record(
        new_pair(
            [{"role": "user", "content": f"question {i} — ünïcode"}],
            [{"role": "assistant", "content": "good answer"}],
            [{"role": "assistant", "content": "bad answer"}],
            source="unit",
            meta={"row": str(i)},
        )
    )
    rec.scores.append(ModelScore(model="best", version="v0", reward_chosen=1.5, reward_rejected=-0.5, p=0.88))
    return rec


def test_round_trip_keeps_every_field_and_keys_by_pair_id():
    rec = record(7)
    out = encode_record(rec, "topic-a")
    assert out.topic == "topic-a"
    assert out.key == rec.pair.id.encode()
    assert header_map(out.headers) == {SCHEMA_HEADER: "v1", TYPE_HEADER: RECORD_TYPE}
    back = decode_record(out.value, out.headers)
    assert back == rec
    assert back.pair.conversation[0].content == "question 7 — ünïcode"


def test_header_map_decodes_bytes_and_tolerates_none():
    assert header_map([("a", b"1"), ("b", None), ("a", b"2")]) == {"a": "2", "b": ""}
    assert header_map(None) == {}


@pytest.mark.parametrize(
    ("value", "headers", "needle"),
    [
        (b"x", [], "missing synpref-schema"),
        (b"x", [(SCHEMA_HEADER, b"v2")], "unsupported synpref-schema 'v2'"),
        (b"x", [(SCHEMA_HEADER, b"v1"), (TYPE_HEADER, b"synpref.v1.Pair")], "expected synpref.v1.PairRecord"),
        (b"", [(SCHEMA_HEADER, b"v1")], "empty payload"),
        (None, [(SCHEMA_HEADER, b"v1")], "empty payload"),
        (b"\xff\xfe garbage", [(SCHEMA_HEADER, b"v1")], "not a synpref.v1.PairRecord protobuf"),
    ],
)
def test_decode_rejects_what_it_cannot_read(value, headers, needle):
    with pytest.raises(PayloadError, match=needle):
        decode_record(value, headers)


def test_decode_rejects_a_record_without_pair_id():
    rec = record()
    rec.pair.id = ""
    out = encode_record(rec, "t")
    assert out.key is None
    with pytest.raises(PayloadError, match="no pair id"):
        decode_record(out.value, out.headers)


def test_dead_letter_keeps_the_message_and_says_why_and_where():
    original = [(SCHEMA_HEADER, b"v1"), ("trace", b"abc"), (DLQ_REASON, b"an older reason")]
    out = dead_letter(
        "dlq",
        key=b"k",
        value=b"\x00raw",
        headers=original,
        kind="undecodable",
        reason="boom " * 1000,
        service="svc",
        source_topic="in",
        source_partition=2,
        source_offset=41,
    )
    assert (out.topic, out.key, out.value) == ("dlq", b"k", b"\x00raw")
    found = header_map(out.headers)
    assert found[SCHEMA_HEADER] == "v1" and found["trace"] == "abc"
    assert found[DLQ_KIND] == "undecodable"
    assert found[DLQ_REASON].startswith("boom ") and len(found[DLQ_REASON]) == MAX_REASON_CHARS
    assert (found[DLQ_SERVICE], found[DLQ_TOPIC], found[DLQ_PARTITION], found[DLQ_OFFSET]) == ("svc", "in", "2", "41")
    # A re-dead-lettered message carries only the newest reason, not a pile of stale ones.
    assert sum(1 for name, _ in out.headers if name == DLQ_REASON) == 1
