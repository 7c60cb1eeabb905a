"""Review desk durability: which Kafka offsets the desk lets go of, and when."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition

from synpref.services.desk import MemoryVerdictSink, ReviewDesk
from synpref.services.desk.inbox import ReviewInbox, pass_through
from synpref.services.desk.kafka_queue import KafkaDeskQueues
from synpref.shared.config import DeskSettings, KafkaSettings, TopicSettings
from synpref.shared.kafka.batch import plan_batch
from synpref.shared.kafka.codec import encode_record
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord

TOKENS = {"alice": "alice-token-0123456789"}
TP = TopicPartition("in", 0)


def message(value: bytes, headers: list, offset: int, key: bytes) -> ConsumerRecord:
    return ConsumerRecord(topic="in", partition=0, leader_epoch=0, offset=offset, timestamp=0, timestamp_type=0,
                          key=key, value=value, headers=headers, checksum=None, serialized_key_size=len(key),
                          serialized_value_size=len(value), serialized_header_size=0)  # fmt: skip


def record(i: int) -> PairRecord:
    pair = new_pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": f"good {i}"}],
                    [{"role": "assistant", "content": f"bad {i}"}], source="unit")  # fmt: skip
    return new_record(pair)


def deliver(inbox: ReviewInbox, offsets: dict[int, PairRecord]) -> None:
    """Feed the inbox one polled batch the way the StageRunner does (write_sourced, then the checkpoint)."""
    msgs = []
    for offset, rec in offsets.items():
        out = encode_record(rec, "in")
        msgs.append(message(out.value, out.headers, offset, out.key))
    plan = plan_batch(msgs, pass_through, TopicSettings(), "desk", to_sink=True)
    inbox.write_sourced(plan.sunk, plan.sunk_from)
    inbox.flush({TP: max(offsets) + 1})


class InboxSource:
    """The Kafka source's logic without a broker: fetch takes from the inbox, ack settles offsets."""

    def __init__(self, inbox: ReviewInbox, fail_acks: int = 0) -> None:
        self.inbox = inbox
        self.fail_acks = fail_acks
        self.commits: list[dict[TopicPartition, int]] = []

    async def fetch(self, limit: int) -> list[tuple[PairRecord, Any]]:
        return self.inbox.take(limit)  # type: ignore[return-value]

    async def ack(self, handles: list[Any]) -> None:
        if self.fail_acks:
            self.fail_acks -= 1
            raise KafkaTimeoutError("commit timed out")
        self.inbox.settle(handles)
        self.commits.append(self.inbox.safe_offsets())

    async def close(self) -> None:
        return None


def test_a_redelivered_pending_pair_keeps_its_offset_open() -> None:
    # After a rebalance the consumer re-reads from the committed offset, so a pair still being
    # reviewed arrives again with the same offset. Acking it as a duplicate would commit past a
    # pair nobody has decided: a crash then loses it.
    async def main() -> None:
        inbox = ReviewInbox()
        deliver(inbox, {0: record(1)})
        desk = ReviewDesk(InboxSource(inbox), MemoryVerdictSink(), DeskSettings(), tokens=TOKENS)
        assert await desk.refill() == 1
        deliver(inbox, {0: record(1)})  # the same message, redelivered
        assert await desk.refill() == 0
        assert inbox.safe_offsets() == {}
        assert inbox.committed[TP] == 0
        assert desk.core.pending == 1

    asyncio.run(main())


def test_a_duplicate_at_another_offset_is_still_settled() -> None:
    async def main() -> None:
        inbox = ReviewInbox()
        deliver(inbox, {0: record(1), 1: record(1)})  # one pair produced twice
        source = InboxSource(inbox)
        desk = ReviewDesk(source, MemoryVerdictSink(), DeskSettings(), tokens=TOKENS)
        assert await desk.refill() == 1
        entry = desk.core.next_for("alice")
        assert entry is not None
        assert await desk.submit("alice", entry.pair_id, 1, "")
        assert inbox.committed[TP] == 2

    asyncio.run(main())


def test_a_failed_ack_loses_neither_replays_nor_offsets() -> None:
    # A batch holds a duplicate of a pending pair (acked at once) and a decided pair sent again
    # (its decision is replayed). If that ack fails, the replay must still be written and every
    # offset settled, or the partition's commit stays behind them for good.
    async def main() -> None:
        inbox = ReviewInbox()
        deliver(inbox, {0: record(1), 1: record(2)})
        source, sink = InboxSource(inbox), MemoryVerdictSink()
        desk = ReviewDesk(source, sink, DeskSettings(), tokens=TOKENS)
        assert await desk.refill() == 2
        first = desk.core.next_for("alice")
        assert first is not None and first.pair_id == record(1).pair.id
        assert await desk.submit("alice", first.pair_id, 0, "")  # discarded: the record keeps its id
        deliver(inbox, {2: record(2), 3: record(1)})
        source.fail_acks = 1
        await desk.tick()  # the ack fails; logged, retried on the next tick
        await desk.tick()
        assert [r.pair.id for _, r in sink.drain().routed] == [record(1).pair.id] * 2
        second = desk.core.next_for("alice")
        assert second is not None and second.pair_id == record(2).pair.id
        assert await desk.submit("alice", second.pair_id, 1, "")
        assert inbox.committed[TP] == 4

    asyncio.run(main())


class FlakyRunner:
    """Stands in for the StageRunner: polls nothing, and its first commit fails like a broker timeout."""

    class Consumer:
        def assignment(self) -> set[TopicPartition]:
            return {TP}

        def paused(self) -> set[TopicPartition]:
            return set()

    def __init__(self) -> None:
        self.consumer = self.Consumer()
        self.failures = 1
        self.committed: dict[TopicPartition, int] = {}

    def run_once(self) -> int:
        return 0

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        if self.failures:
            self.failures -= 1
            raise KafkaTimeoutError("commit timed out")
        self.committed.update(offsets)


def test_a_commit_that_failed_is_retried_on_an_idle_desk() -> None:
    # The desk's decisions live in memory only: an offset that is never committed makes a restart
    # hand already-decided pairs to the annotators again.
    queues = KafkaDeskQueues(KafkaSettings(), TopicSettings(), "g")
    runner = FlakyRunner()
    queues.runner = runner  # type: ignore[assignment]
    try:
        deliver(queues.inbox, {0: record(1)})
        assert queues._fetch(10) != []
        with contextlib.suppress(KafkaTimeoutError):
            queues._ack([(TP, 0)])  # settled, but the commit times out
        queues._fetch(10)  # the next tick: nothing new to read
        assert runner.committed == {TP: 1}
    finally:
        queues._executor.shutdown()


class SlowSource:
    """An endless review topic whose fetch takes a while, as a Kafka poll does."""

    def __init__(self) -> None:
        self.served = 0

    async def fetch(self, limit: int) -> list[tuple[PairRecord, Any]]:
        await asyncio.sleep(0.01)
        self.served += limit
        return [(record(self.served - i), None) for i in range(limit)]

    async def ack(self, handles: list[Any]) -> None:
        return None

    async def close(self) -> None:
        return None


def test_concurrent_refills_never_hold_more_than_max_pending() -> None:
    # /api/next refills when an annotator finds nothing while the tick refills too.
    async def main() -> None:
        desk = ReviewDesk(SlowSource(), MemoryVerdictSink(), DeskSettings(max_pending=3), tokens=TOKENS)
        await asyncio.gather(desk.refill(), desk.refill(), desk.refill())
        assert desk.core.pending == 3

    asyncio.run(main())
