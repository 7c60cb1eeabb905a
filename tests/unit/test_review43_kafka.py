"""Review 43, the Kafka core: what a dead letter may weigh under a small message limit."""

from synpref.shared.kafka.codec import (
    DLQ_DROPPED,
    DLQ_KIND,
    DLQ_OFFSET,
    DLQ_REASON,
    DLQ_TOPIC,
    dead_letter,
    header_map,
    record_headers,
)


def reduced(reason: str, key: bytes, max_bytes: int):
    return dead_letter("dlq", key=key, value=b"v" * 5000, headers=record_headers(), kind="stage-error",
                       reason=reason, service="annotator", source_topic="synpref.s2.scored", source_partition=3,
                       source_offset=123456, max_bytes=max_bytes)  # fmt: skip


def test_a_reduced_dead_letter_fits_the_limit_even_with_a_long_non_ascii_reason_and_key():
    # 2000 characters of reason are up to 8000 bytes, and a kept key 1 KiB: the "reduced" copy was refused by the
    # broker as the full one would have been, failing the batch on every restart.
    for limit in (1024, 2048, 4096):
        out = reduced("é" * 3000, b"k" * 1000, limit)
        assert out.size <= limit, (limit, out.size)
        found = header_map(out.headers)
        assert (found[DLQ_KIND], found[DLQ_TOPIC], found[DLQ_OFFSET]) == ("stage-error", "synpref.s2.scored", "123456")
        assert found[DLQ_DROPPED] and found[DLQ_REASON].startswith("é"), "as much of the reason as fits, whole chars"


def test_a_reduced_dead_letter_keeps_key_and_reason_where_they_fit():
    out = reduced("stage raised ValueError: bad pair", b"k" * 32, 2048)
    assert out.key == b"k" * 32 and out.value == b""
    assert header_map(out.headers)[DLQ_REASON].startswith("stage raised ValueError: bad pair; the message")


def test_a_reduced_dead_letter_keeps_its_key_and_cuts_the_reason_to_the_room_left():
    # Before, a reason longer than the room left dropped the key (the pair id) first: the controller then could not
    # tell which of its records the dead letter ended (review 44: it ends them by that key when there is no payload).
    pair_id = b"0123456789abcdef" * 4
    for limit in (1024, 2048):
        out = reduced("stage raised " + "x" * 5000, pair_id, limit)
        assert out.size <= limit and out.key == pair_id
        assert header_map(out.headers)[DLQ_REASON].startswith("stage raised xxx")
