"""Review 43, the desk's Kafka queue on a real broker: fresh clients read the review topic again from the group's
offset, below pairs the desk already decided."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from kafka_broker import produce, read_topic

from synpref.services.desk import ReviewDesk
from synpref.services.desk.kafka_queue import KafkaDeskQueues
from synpref.shared.config import DeskSettings
from synpref.shared.pairs import new_pair, new_record
from synpref.v1.pair_pb2 import PairRecord

pytestmark = pytest.mark.integration
TOKENS = {"alice": "alice-token-0123456789abcdef-ghij", "bob": "bob-token-0123456789abcdef-ghijkl"}


def record(i: int) -> PairRecord:
    return new_record(
        new_pair(
            [{"role": "user", "content": f"review43 q{i}"}],
            [{"role": "assistant", "content": f"good {i}"}],
            [{"role": "assistant", "content": f"bad {i}"}],
            source="review43",
        )
    )


async def fill(desk: ReviewDesk, want: int) -> None:
    deadline = time.monotonic() + 60
    while desk.core.pending < want:
        assert time.monotonic() < deadline, f"desk holds {desk.core.pending} pairs, wanted {want}"
        await desk.refill()


def test_fresh_clients_do_not_write_a_decided_pair_again(
    kafka_settings: Any, unique_topics: Any, unique_group: Any
) -> None:
    # Alice keeps the oldest pair open, so the group's offset stays at 0 while Bob decides the next two. Fresh
    # clients (the desk reconnects after dead letters were not acknowledged; a rebalance resets positions the same
    # way) read from offset 0 again: each of Bob's decisions was written a second time.
    topics = unique_topics(partitions=1)
    kafka = kafka_settings.kafka
    recs = [record(i) for i in range(4)]
    produce(kafka, topics.review, recs[:3])  # offsets 0, 1, 2

    async def scenario() -> dict[int, int | None]:
        queues = KafkaDeskQueues(kafka, topics, unique_group())
        desk = ReviewDesk(queues.source, queues.sink, DeskSettings(), tokens=TOKENS)
        await fill(desk, 3)
        held = desk.core.next_for("alice")
        assert held is not None and held.pair_id == recs[0].pair.id
        for rec in recs[1:3]:
            entry = desk.core.next_for("bob")
            assert entry is not None and entry.pair_id == rec.pair.id
            assert await desk.submit("bob", entry.pair_id, 0, "")  # discarded: the record keeps its id
        assert await queues.committed() == {0: 0}
        await queues._run(queues._disconnect, "test: fresh clients")
        queues.backoff.succeeded()  # reconnect at the next fetch
        produce(kafka, topics.review, [recs[3]])  # offset 3: read only after 0 to 2 were read again
        await fill(desk, 2)
        await desk.flush()
        committed = await queues.committed()
        await desk.close()
        return committed

    assert asyncio.run(scenario()) == {0: 0}
    written = Counter(r.key.decode() for r in read_topic(kafka, topics.discarded))
    assert written == {recs[1].pair.id: 1, recs[2].pair.id: 1}
