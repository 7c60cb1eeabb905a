"""Review 39, the desk's Kafka queue on a real broker: what it may commit after a dead letter was not delivered."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from kafka.errors import KafkaError
from kafka.future import Future
from kafka_broker import produce, read_topic

from synpref.services.desk import ReviewDesk
from synpref.services.desk.kafka_queue import KafkaDeskQueues
from synpref.services.desk.web import QueueUnreachable
from synpref.shared.config import DeskSettings
from synpref.shared.kafka.clients import DeliveryError, make_producer
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord

pytestmark = pytest.mark.integration
TOKENS = {"a": "a-token-0123456789abcdef-ghijklmn"}


def record(i: int) -> PairRecord:
    return new_record(
        new_pair(
            [{"role": "user", "content": f"review39 q{i}"}],
            [{"role": "assistant", "content": f"good {i}"}],
            [{"role": "assistant", "content": f"bad {i}"}],
            source="review39",
        )
    )


class NoDeadLetters:
    """The runner's real producer, except that the broker refuses every dead letter (an ACL, a deleted topic)."""

    def __init__(self, real: Any, dead_letter: str) -> None:
        self.real, self.dead_letter = real, dead_letter

    def send(self, topic: str, *args: Any, **kwargs: Any) -> Any:
        if topic == self.dead_letter:
            return Future().failure(KafkaError("refused by the broker"))
        return self.real.send(topic, *args, **kwargs)

    def flush(self, timeout: float | None = None) -> None:
        self.real.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        self.real.close(timeout=timeout)


async def fill(desk: ReviewDesk, want: int) -> None:
    deadline = time.monotonic() + 60
    while desk.core.pending < want:
        assert time.monotonic() < deadline, f"desk holds {desk.core.pending} pairs, wanted {want}"
        await desk.refill()


def test_a_decided_pair_does_not_commit_past_an_unacknowledged_dead_letter(
    kafka_settings: Any, unique_topics: Any, unique_group: Any
) -> None:
    # The checkpoint flushes the desk's inbox, which noted how far polling got, before it waits for the batch's
    # dead letters. When they were refused, deciding an older pair committed past them: the undecodable message
    # was in neither the dead-letter topic nor the review topic's uncommitted range.
    topics = unique_topics(partitions=1)
    kafka = kafka_settings.kafka
    group = unique_group()
    first, later = record(1), record(2)
    produce(kafka, topics.review, [first])  # offset 0

    async def decide_while_dead_letters_fail() -> None:
        queues = KafkaDeskQueues(kafka, topics, group)
        desk = ReviewDesk(queues.source, queues.sink, DeskSettings(), tokens=TOKENS)
        await fill(desk, 1)
        runner = queues.runner
        runner.producer = runner.outbox.producer = NoDeadLetters(runner.producer, topics.dead_letter)  # type: ignore[union-attr]
        junk = make_producer(kafka)
        junk.send(topics.review, key=b"junk", value=b"not a protobuf").get(timeout=30)  # offset 1
        junk.close(timeout=10)
        produce(kafka, topics.review, [later])  # offset 2
        deadline = time.monotonic() + 60
        with pytest.raises(DeliveryError):
            while time.monotonic() < deadline:
                await queues.source.fetch(10)
        entry = desk.core.next_for("a")
        assert entry is not None and entry.pair_id == first.pair.id
        assert await desk.submit("a", entry.pair_id, 1, "") is True
        assert desk._outbox == [] and desk._acks == []  # written and acknowledged
        committed = await queues.committed()
        # Offset 1's dead letter was never acknowledged: the group must not move past it (it was at 2).
        assert committed[0] is not None and committed[0] <= 1, committed
        while desk.core.pending < 1:  # the desk's ticks: fresh clients read offsets 1 and 2 again
            assert time.monotonic() < deadline + 60, "the desk never read the later pair"
            with contextlib.suppress(QueueUnreachable):  # the reconnect back-off: the queue cannot be read yet
                await desk.refill()
        await desk.close()

    asyncio.run(decide_while_dead_letters_fail())

    async def restart() -> list[str]:
        queues = KafkaDeskQueues(kafka, topics, group)
        desk = ReviewDesk(queues.source, queues.sink, DeskSettings(), tokens=TOKENS)
        await fill(desk, 1)
        held = [e.pair_id for e in desk.core._pending.values()]
        await desk.close()
        return held

    assert asyncio.run(restart()) == [later.pair.id]
    dlq = read_topic(kafka, topics.dead_letter, expect=1)
    assert [m.value for m in dlq] == [b"not a protobuf"]


def test_the_desk_reads_again_after_a_dead_letter_was_not_acknowledged(
    kafka_settings: Any, unique_topics: Any, unique_group: Any
) -> None:
    # The runner's outbox fails for good after a loss, so every later fetch raised the same DeliveryError: the
    # desk never read another pair (its tick only logs, and /healthz said ok) until someone restarted it.
    topics = unique_topics(partitions=1)
    kafka = kafka_settings.kafka
    recs = [record(10), record(11)]

    async def scenario() -> tuple[list[str], dict[int, int | None]]:
        queues = KafkaDeskQueues(kafka, topics, unique_group())
        desk = ReviewDesk(queues.source, queues.sink, DeskSettings(), tokens=TOKENS)
        runner = queues._opened()
        runner.producer = runner.outbox.producer = NoDeadLetters(runner.producer, topics.dead_letter)  # type: ignore[union-attr]
        junk = make_producer(kafka)
        junk.send(topics.review, key=b"junk", value=b"not a protobuf").get(timeout=30)  # offset 0
        junk.close(timeout=10)
        produce(kafka, topics.review, recs)  # offsets 1, 2
        deadline = time.monotonic() + 60
        with pytest.raises(DeliveryError):
            while time.monotonic() < deadline:
                await queues.source.fetch(10)
        seen: list[str] = []
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"the desk got {seen} after the failure, wanted both pairs"
            with contextlib.suppress(QueueUnreachable):  # a failed poll, or the reconnect back-off after it
                await desk.refill()
            entry = desk.core.next_for("a")
            if entry is not None:
                seen.append(entry.pair_id)
                assert await desk.submit("a", entry.pair_id, 1, "") is True
        committed = await queues.committed()
        await desk.close()
        return seen, committed

    seen, committed = asyncio.run(scenario())
    assert seen == [r.pair.id for r in recs]
    assert committed == {0: 3}
    assert [m.value for m in read_topic(kafka, topics.dead_letter, expect=1)] == [b"not a protobuf"]
