"""The desk's Kafka backend: read the review topic, write the verified and discarded topics.

Delivery, step by step (at-least-once, like the stage runner):
  1. poll review records with a consumer group (auto-commit off); an undecodable message
     goes to the dead-letter topic at once and counts as settled;
  2. a pair stays open until its decision is produced AND flushed with acks=all;
  3. only then is it settled, and the group's offset on its partition moves up to the
     first offset still open: a pair decided out of order waits for the older ones.
A desk that stops or crashes re-reads every pair after the committed offset: undecided
pairs come back (never lost), and a pair decided after an older, still-open one may
come back too and be labelled again (a duplicate on the verified topic, which
downstream deduplicates by pair id). Assignments live in memory, so run one desk
replica per consumer group.

kafka-python clients are not thread-safe, so every call on them runs on one worker
thread; the event loop only awaits it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata, TopicPartition

from synpref.shared.config import KafkaSettings, TopicSettings
from synpref.shared.kafka import metrics
from synpref.shared.kafka.clients import deliver, make_consumer, make_producer
from synpref.shared.kafka.codec import Outgoing, PayloadError, dead_letter_for, decode_record, encode_record
from synpref.v1.pair_pb2 import PairRecord

log = logging.getLogger("synpref.desk.kafka")

SERVICE = "desk"
T = TypeVar("T")
Handle = tuple[TopicPartition, int]


def commit_point(open_offsets: dict[int, bool]) -> int | None:
    """The offset to commit on a partition: the first still-open one, or one past the last settled.

    `open_offsets` maps each offset handed out and not yet committed to whether it is settled.
    None when nothing was handed out.
    """
    if not open_offsets:
        return None
    unsettled = [o for o, settled in open_offsets.items() if not settled]
    return min(unsettled) if unsettled else max(open_offsets) + 1


class KafkaDeskQueues:
    """One consumer and one producer on one worker thread; `.source` and `.sink` for ReviewDesk."""

    def __init__(self, kafka: KafkaSettings, topics: TopicSettings, group_id: str, flush_timeout_s: float = 60.0):
        self.kafka = kafka
        self.topics = topics
        self.group_id = group_id
        self.flush_timeout_s = flush_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synpref-desk-kafka")
        self._consumer: Any = None
        self._producer: Any = None
        self._open: dict[TopicPartition, dict[int, bool]] = {}
        self._closed = False
        self.source = KafkaReviewSource(self)
        self.sink = KafkaVerdictSink(self)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _clients(self) -> tuple[Any, Any]:
        if self._consumer is None:
            self._producer = make_producer(self.kafka)
            self._consumer = make_consumer(self.kafka, self.group_id, self.topics.review)
            log.info("desk: consuming %s as group %s", self.topics.review, self.group_id)
        return self._consumer, self._producer

    # -- worker-thread side ----------------------------------------------------------------
    def _fetch(self, limit: int) -> list[tuple[PairRecord, Handle]]:
        consumer, _ = self._clients()
        assigned = consumer.assignment()
        if limit <= 0:
            # Full: keep polling so the group does not evict us, but take nothing new.
            if assigned:
                consumer.pause(*assigned)
            consumer.poll(timeout_ms=0)
            return []
        if consumer.paused():
            consumer.resume(*consumer.paused())
        polled = consumer.poll(timeout_ms=self.kafka.consumer_poll_ms, max_records=limit)
        out: list[tuple[PairRecord, Handle]] = []
        rejects = []
        for tp, messages in polled.items():
            offsets = self._open.setdefault(tp, {})
            for msg in messages:
                try:
                    record = decode_record(msg.value, msg.headers)
                except PayloadError as exc:
                    rejects.append(self._dead_letter(msg, str(exc)))
                    offsets[msg.offset] = True
                    continue
                offsets[msg.offset] = False
                out.append((record, (tp, msg.offset)))
        if rejects:
            self._send(rejects)
            self._commit()
        metrics.report_lag(consumer, SERVICE)
        return out

    def _dead_letter(self, msg: Any, reason: str) -> Outgoing:
        dlq, limit = self.topics.dead_letter, self.kafka.max_message_bytes
        return dead_letter_for(msg, dlq, kind="undecodable", reason=reason, service=SERVICE, max_bytes=limit)

    def _send(self, messages: list[Outgoing]) -> None:
        _, producer = self._clients()
        deliver(producer, messages, self.flush_timeout_s)

    def _write(self, routed: list[tuple[str, PairRecord]]) -> None:
        self._send([encode_record(record, getattr(self.topics, route)) for route, record in routed])

    def _ack(self, handles: list[Handle]) -> None:
        for tp, offset in handles:
            offsets = self._open.get(tp)
            if offsets is not None and offset in offsets:
                offsets[offset] = True
        self._commit()

    def _commit(self) -> None:
        consumer, _ = self._clients()
        commits: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, offsets in self._open.items():
            point = commit_point(offsets)
            if point is None:
                continue
            commits[tp] = OffsetAndMetadata(point, "", -1)
            for offset in [o for o in offsets if o < point]:
                del offsets[offset]
        if not commits:
            return
        try:
            consumer.commit(commits)
        except CommitFailedError as exc:
            # The group rebalanced: the partition's new owner re-reads from the last commit (duplicates, no loss).
            log.warning("desk: commit failed after a rebalance; open pairs will be re-delivered: %s", exc)

    def _close(self) -> None:
        consumer, producer, self._consumer, self._producer = self._consumer, self._producer, None, None
        if producer is not None:
            producer.close(timeout=self.flush_timeout_s)
        if consumer is not None:
            consumer.close(autocommit=False)

    # -- event-loop side -------------------------------------------------------------------
    async def close(self) -> None:
        """Close the producer and consumer on the worker thread (no commit), then stop the thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def committed(self) -> dict[int, int | None]:
        """partition -> this group's committed offset on the review topic (for tests and operators)."""
        return await self._run(self._committed)

    def _committed(self) -> dict[int, int | None]:
        consumer, _ = self._clients()
        parts = consumer.partitions_for_topic(self.topics.review) or set()
        return {p: consumer.committed(TopicPartition(self.topics.review, p)) for p in sorted(parts)}


class KafkaReviewSource:
    """The ReviewSource side of KafkaDeskQueues: fetches from the review topic, acks by committing offsets."""

    def __init__(self, queues: KafkaDeskQueues) -> None:
        self.queues = queues

    async def fetch(self, limit: int) -> list[tuple[PairRecord, Any]]:
        """Up to `limit` records from the review topic with their (partition, offset) handles.

        Undecodable messages go to the dead-letter topic; limit 0 pauses the partitions and only polls (keep-alive).
        """
        return await self.queues._run(self.queues._fetch, limit)  # type: ignore[return-value]

    async def ack(self, handles: list[Any]) -> None:
        """Mark these offsets settled and commit every partition up to its first unsettled offset."""
        await self.queues._run(self.queues._ack, handles)

    async def close(self) -> None:
        """Close the shared queues (both sides)."""
        await self.queues.close()


class KafkaVerdictSink:
    """The VerdictSink side of KafkaDeskQueues: produces decisions to their routes' topics."""

    def __init__(self, queues: KafkaDeskQueues) -> None:
        self.queues = queues

    async def write(self, routed: list[tuple[str, PairRecord]]) -> None:
        """Produce each (route, record) to the route's topic and wait until all are acknowledged."""
        await self.queues._run(self.queues._write, routed)

    async def close(self) -> None:
        """Close the shared queues (both sides)."""
        await self.queues.close()
