"""The desk's sink on the StageRunner: which offsets it hands out and which it lets the runner commit."""

from __future__ import annotations

from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from synpref.services.desk.inbox import ReviewInbox, pass_through
from synpref.shared.config import TopicSettings
from synpref.shared.kafka.batch import plan_batch
from synpref.shared.kafka.codec import encode_record
from synpref.shared.pairs import new_pair, new_record

TP = TopicPartition("in", 0)


def message(value: bytes, headers: list, offset: int = 0, key: bytes | None = b"k") -> ConsumerRecord:
    return ConsumerRecord(topic="in", partition=0, leader_epoch=0, offset=offset, timestamp=0, timestamp_type=0,
                          key=key, value=value, headers=headers, checksum=None, serialized_key_size=len(key or b""),
                          serialized_value_size=len(value), serialized_header_size=0)  # fmt: skip


def encoded(i: int, offset: int | None = None) -> ConsumerRecord:
    pair = new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": f"good {i}"}],
                    [{"role": "assistant", "content": f"bad {i}"}], source="unit")  # fmt: skip
    out = encode_record(new_record(pair), "in")
    return message(out.value, out.headers, i if offset is None else offset, out.key)


def inbox_after(messages: list) -> ReviewInbox:
    """An inbox fed one batch the way the runner feeds it: write_sourced, then the checkpoint's flush."""
    plan = plan_batch(messages, pass_through, TopicSettings(), "desk", to_sink=True)
    inbox = ReviewInbox()
    inbox.write_sourced(plan.sunk, plan.sunk_from)
    inbox.flush({TP: max(m.offset for m in messages) + 1})
    return inbox


def test_a_pair_id_twice_in_one_batch_keeps_both_offsets_open() -> None:
    twice = [encoded(7, offset=3), encoded(7, offset=4)]
    plan = plan_batch([message(b"junk", [], offset=2), *twice], pass_through, TopicSettings(), "desk", to_sink=True)
    assert [m.offset for m in plan.sunk_from if m is not None] == [3, 4]
    assert plan.dead_lettered == 1


def test_the_commit_waits_for_the_oldest_undecided_pair() -> None:
    inbox = inbox_after([message(b"junk", [], offset=0), encoded(1), encoded(2), encoded(3)])
    assert inbox.committed == {TP: 1}  # the dead letter is settled; offset 1 is still open
    handed = inbox.take(10)
    assert [h for _, h in handed] == [(TP, 1), (TP, 2), (TP, 3)]
    inbox.settle([(TP, 3)])
    assert inbox.safe_offsets() == {}  # decided out of order: 1 and 2 still hold the partition
    inbox.settle([(TP, 1)])
    assert inbox.safe_offsets() == {TP: 2}
    inbox.settle([(TP, 2), None, (TP, 99)])
    assert inbox.safe_offsets() == {TP: 4}
    assert inbox.safe_offsets() == {}  # nothing moved: nothing to commit again


def test_a_batch_of_dead_letters_commits_past_itself() -> None:
    inbox = inbox_after([message(b"junk", [], offset=5), message(b"more junk", [], offset=6)])
    assert inbox.committed == {TP: 7}
    assert inbox.take(10) == []


def test_take_hands_out_no_more_than_asked() -> None:
    inbox = inbox_after([encoded(i) for i in range(4)])
    assert len(inbox.take(3)) == 3
    assert len(inbox.take(3)) == 1
