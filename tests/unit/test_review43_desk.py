"""Review 43, the desk's Kafka side: what the group reading the review topic again (a rebalance, fresh clients
after a failure) hands the desk, and what it commits afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from synpref.services.desk import DeskCore, MemoryVerdictSink, ReviewDesk
from synpref.services.desk.inbox import ReviewInbox, pass_through
from synpref.services.desk.kafka_queue import KafkaDeskQueues
from synpref.shared.config import DeskSettings, KafkaSettings, TopicSettings
from synpref.shared.kafka.batch import plan_batch
from synpref.shared.kafka.codec import encode_record
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}
TP = TopicPartition("in", 0)


def record(i: int) -> PairRecord:
    pair = new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": f"good {i}"}],
                    [{"role": "assistant", "content": f"bad {i}"}], source="review43")  # fmt: skip
    return new_record(pair)


def deliver(inbox: ReviewInbox, offsets: dict[int, PairRecord]) -> dict[TopicPartition, int]:
    """Feed the inbox one polled batch the way the StageRunner does (write_sourced, then the checkpoint's flush);
    returns what the checkpoint commits."""
    msgs = []
    for offset, rec in offsets.items():
        out = encode_record(rec, "in")
        msgs.append(ConsumerRecord(topic="in", partition=0, leader_epoch=0, offset=offset, timestamp=0,
                                   timestamp_type=0, key=out.key, value=out.value, headers=out.headers, checksum=None,
                                   serialized_key_size=len(out.key or b""), serialized_value_size=len(out.value),
                                   serialized_header_size=0))  # fmt: skip
    plan = plan_batch(msgs, pass_through, TopicSettings(), "desk", to_sink=True)
    inbox.write_sourced(plan.sunk, plan.sunk_from)
    return inbox.flush({TP: max(offsets) + 1})


class InboxSource:
    """The Kafka source's logic without a broker: fetch takes from the inbox, ack settles offsets."""

    def __init__(self, inbox: ReviewInbox) -> None:
        self.inbox = inbox

    async def fetch(self, limit: int) -> list[tuple[PairRecord, Any]]:
        return self.inbox.take(limit)  # type: ignore[return-value]

    async def ack(self, handles: list[Any]) -> None:
        self.inbox.settle(handles)
        self.inbox.safe_offsets()

    async def close(self) -> None:
        return None


def test_a_reread_neither_writes_a_decision_again_nor_shows_a_decided_pair_again() -> None:
    # Pairs decided after an older, still-open one stay above the group's offset. When the group reads again from
    # it (a rebalance, fresh clients after a failed dead letter), the inbox handed them to the desk once more: each
    # decision was written to `verified` a second time, and one the desk no longer remembered (10,000 decisions by
    # default, 1 here) went to an annotator to be labelled again, possibly the other way round (a flip gets a new id,
    # so D_gold held both orientations of the pair).
    async def main() -> None:
        inbox = ReviewInbox()
        first, second, third = record(1), record(2), record(3)
        deliver(inbox, {0: first, 1: second, 2: third})
        sink = MemoryVerdictSink()
        desk = ReviewDesk(InboxSource(inbox), sink, DeskSettings(), tokens=TOKENS, core=DeskCore(remember=1))
        assert await desk.refill() == 3
        held = desk.core.next_for("alice")  # alice keeps the oldest pair open
        assert held is not None and held.pair_id == first.pair.id
        for pair in (second, third):
            entry = desk.core.next_for("bob")
            assert entry is not None and entry.pair_id == pair.pair.id
            assert await desk.submit("bob", entry.pair_id, 1, "")
        assert len(sink.drain().routed) == 2
        assert inbox.committed[TP] == 0  # the open pair holds the partition

        deliver(inbox, {0: first, 1: second, 2: third})  # the group reads again from its offset
        await desk.tick()
        assert [r.pair.id for _, r in sink.drain().routed] == []
        assert desk.core.next_for("bob") is None
        assert desk.core.pending == 1

        assert await desk.submit("alice", first.pair.id, 2, "")
        assert inbox.committed[TP] == 3

    asyncio.run(main())


class SwallowingRunner:
    """Stands in for the StageRunner. Its first commit does not reach the group but raises nothing, as
    StageRunner._commit does with a CommitFailedError (the consumer was out of the group: fresh clients, a session
    that timed out); run_once then polls what the rejoined group reads again from its offset."""

    class Consumer:
        def assignment(self) -> set[TopicPartition]:
            return {TP}

        def paused(self) -> set[TopicPartition]:
            return set()

    def __init__(self, inbox: ReviewInbox) -> None:
        self.consumer, self.inbox = self.Consumer(), inbox
        self.swallow = 1
        self.committed: dict[TopicPartition, int] = {}
        self.reread: dict[int, PairRecord] = {}

    def run_once(self) -> int:
        if not self.reread:
            return 0
        batch, self.reread = self.reread, {}
        self.commit(deliver(self.inbox, batch))
        return len(batch)

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        if self.swallow:
            self.swallow -= 1
            return
        self.committed.update(offsets)


def test_a_commit_the_group_did_not_take_is_sent_again_once_it_reads_again() -> None:
    # The inbox counts an offset committed before the commit is sent. The runner only logs a CommitFailedError, so
    # the desk believed the group was past its decided pairs; the group then reads them again from its real offset.
    # They must not go to the desk again, and the offset must still be committed, or a restart hands them out again.
    queues = KafkaDeskQueues(KafkaSettings(), TopicSettings(), "g")
    runner = SwallowingRunner(queues.inbox)
    queues.runner = runner  # type: ignore[assignment]
    try:
        only = record(1)
        deliver(queues.inbox, {0: only})
        assert [h for _, h in queues._fetch(10)] == [(TP, 0)]
        queues._ack([(TP, 0)])  # decided and written; the commit of offset 1 is lost
        assert runner.committed == {}
        runner.reread = {0: only}  # the rejoined group reads from offset 0 again
        assert queues._fetch(10) == []
        assert runner.committed == {TP: 1}
    finally:
        queues._executor.shutdown()
