"""The desk's Kafka backend: read the review topic, write the verified and discarded topics.

The desk runs on the shared StageRunner (shared/kafka/runner.py) with a pass-through stage and a sink, ReviewInbox,
that holds the records until the desk decides them. Delivery, step by step (at-least-once, like every stage):
  1. the runner polls the review topic (auto-commit off); an undecodable message, or a pair whose id no verdict could
     name (core.PAIR_ID), goes to the dead-letter topic through the runner's dead-letter helper and counts as settled;
  2. a pair stays open until its decision is produced through the runner's producer AND acknowledged (acks=all); a
     decision over its topic's message limit goes to the dead-letter topic instead, as the runner's outputs do;
  3. only then is it settled, and the group's offset on its partition moves up to the first offset still open: a pair
     decided out of order waits for the older ones.
A desk that stops or crashes re-reads every pair after the committed offset: undecided pairs come back (never lost),
and a pair decided after an older, still-open one may come back too and be labelled again (a duplicate on the verified
topic: the controller keeps one verdict per ingest key, lineage.original_id, which a flip keeps). Assignments live in
memory, so run one desk replica per consumer group. A full desk (desk.max_pending) pauses its partitions and only
polls to stay in the group.

kafka-python clients are not thread-safe, so every call on the runner runs on one worker thread; the event loop only
awaits it. Clients closed after a failure are reopened after a back-off (1, 2, 4 ... 60 s, reset by a poll that
succeeds); KafkaHealth records which operations fail and since when, for the desk's /readyz. An empty poll does not
fail when the broker is gone: a desk that heard nothing from Kafka for probe_every_s asks it for metadata
(_probe_if_quiet).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kafka.structs import TopicPartition

from synpref.services.desk.core import commit_point, pair_id_problem
from synpref.shared.config import DeskSettings, KafkaSettings, Settings, TopicSettings
from synpref.shared.kafka.clients import DeliveryError, deliver
from synpref.shared.kafka.codec import Message, Outgoing, dead_letter_for, encode_record
from synpref.shared.kafka.runner import StageRunner, capped_backoff
from synpref.shared.stage import StageResult
from synpref.v1.pair_pb2 import PairRecord

log = logging.getLogger("synpref.desk.kafka")

SERVICE = "desk"
T = TypeVar("T")
Handle = tuple[TopicPartition, int]
RECONNECT_FIRST_S, RECONNECT_MAX_S = 1.0, 60.0
PROBE_EVERY_MAX_S, PROBE_TIMEOUT_MAX_S = 15.0, 5.0  # an idle desk's metadata requests: interval, timeout


class ReconnectPending(Exception):
    """The Kafka clients were closed after a failure and the back-off before reopening them has not run out."""


class ReconnectBackoff:
    """How long to wait before reopening the Kafka clients: first_s, doubled for each failure in a row, at most
    max_s; `succeeded` resets it."""

    def __init__(
        self,
        first_s: float = RECONNECT_FIRST_S,
        max_s: float = RECONNECT_MAX_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.first_s, self.max_s, self.clock = first_s, max_s, clock
        self.failures, self.not_before = 0, 0.0

    def failed(self) -> float:
        """Count a failure; returns the delay before the next attempt."""
        self.failures += 1
        delay = capped_backoff(self.failures, self.max_s, self.first_s)
        self.not_before = self.clock() + delay
        return delay

    def wait_s(self) -> float:
        """Seconds left before the next attempt may start; 0 = now."""
        return max(0.0, self.not_before - self.clock())

    def succeeded(self) -> None:
        self.failures, self.not_before = 0, 0.0


class KafkaHealth:
    """Which of the desk's Kafka operations (read, write, commit) fail, since when, and with what: written on the
    worker thread, read by /readyz on the event loop, hence the lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._failing: dict[str, tuple[float, str]] = {}
        """operation -> (first failure with no success since, the last failure's exception type)."""

    def failed(self, operation: str, exc: BaseException, since: float | None = None) -> None:
        """Note a failure; a first one counts from `since` (default: now)."""
        with self._lock:
            since = self._failing.get(operation, (self.clock() if since is None else since, ""))[0]
            self._failing[operation] = (since, type(exc).__name__)

    def succeeded(self, operation: str) -> None:
        with self._lock:
            self._failing.pop(operation, None)

    def problem(self, bound_s: float) -> str | None:
        """Why the desk cannot work, when an operation has failed for longer than `bound_s`; else None. Names the
        operation and the exception type only: /readyz answers anyone, the log has the details."""
        now = self.clock()
        with self._lock:
            late = sorted((since, op, kind) for op, (since, kind) in self._failing.items() if now - since > bound_s)
        if not late:
            return None
        since, operation, kind = late[0]
        return f"Kafka {operation} failing for {now - since:.0f}s ({kind}); see the desk's log"


def pass_through(batch: list[PairRecord]) -> StageResult:
    """The desk's stage: every review record goes to the desk (the inbox) as it is, but one whose pair id no verdict
    could name: the runner dead-letters that one (and commits past it) rather than hold its partition for ever."""
    problems = [(record, pair_id_problem(record.pair.id)) for record in batch]
    return StageResult(
        routed=[("review", record) for record, problem in problems if problem is None],
        failed=[(record, f"the desk cannot take it: {problem}") for record, problem in problems if problem],
    )


class ReviewInbox:
    """The runner's sink for the desk: records wait here until fetched, offsets until settled."""

    keeps_offsets = False

    def __init__(self) -> None:
        self.waiting: deque[tuple[PairRecord, Handle | None]] = deque()
        self.open: dict[TopicPartition, dict[int, bool]] = {}
        self.polled_to: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.settled_below: dict[TopicPartition, int] = {}
        """Per partition, the highest commit point reached: every record below it is settled."""

    def write(self, routed: list[tuple[str, PairRecord]]) -> None:
        """Take records without their offsets (unused: the runner calls write_sourced)."""
        self.write_sourced(routed, [None] * len(routed))

    def write_sourced(self, routed: list[tuple[str, PairRecord]], sources: list[Message | None]) -> None:
        """Hold each record for the desk, its offset open until the desk settles it; skip one read again."""
        for (_, record), msg in zip(routed, sources, strict=True):
            handle = None
            if msg is not None:
                tp, offset = TopicPartition(msg.topic, msg.partition), msg.offset
                handle = (tp, offset)
                offsets = self.open.setdefault(tp, {})
                if offset in offsets or offset < self.settled_below.get(tp, 0):
                    # Read again from the group's offset (a rebalance, fresh clients): the desk holds the pair or
                    # wrote its decision, so not again. The group's offset is behind ours (a commit failed): resend.
                    self.committed.pop(tp, None)
                    continue
                offsets[offset] = False
            self.waiting.append((record, handle))

    def take(self, limit: int) -> list[tuple[PairRecord, Handle | None]]:
        """Up to `limit` held records, oldest first."""
        return [self.waiting.popleft() for _ in range(min(limit, len(self.waiting)))]

    def settle(self, handles: list[Any]) -> None:
        """Mark these (partition, offset) handles settled; unknown ones are ignored."""
        for handle in handles:
            if handle is None:
                continue
            tp, offset = handle
            offsets = self.open.get(tp)
            if offsets is not None and offset in offsets:
                offsets[offset] = True

    def due(self) -> bool:
        """Every batch is a checkpoint: dead letters are acknowledged and settled offsets committed at once."""
        return True

    def flush(self, offsets: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Nothing to write; note how far polling got and return what is safe to commit."""
        for tp, offset in offsets.items():
            self.polled_to[tp] = max(self.polled_to.get(tp, 0), offset)
        return self.safe_offsets()

    def safe_offsets(self) -> dict[TopicPartition, int]:
        """Per partition, the first offset still open (or where polling got to), where it moved since the last call."""
        moved: dict[TopicPartition, int] = {}
        for tp, polled in self.polled_to.items():
            offsets = self.open.get(tp, {})
            point = commit_point(offsets, polled)
            if point is None or point == self.committed.get(tp):
                continue
            moved[tp] = self.committed[tp] = point
            self.settled_below[tp] = max(point, self.settled_below.get(tp, 0))
            for offset in [o for o in offsets if o < point]:
                del offsets[offset]
        return moved

    def stored_offsets(self) -> Mapping[TopicPartition, int]:
        """None of its own: the group's committed offsets are where the desk resumes."""
        return {}


class KafkaDeskQueues:
    """A StageRunner with a ReviewInbox on one worker thread; `.source` and `.sink` for ReviewDesk."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        group_id: str,
        flush_timeout_s: float = 60.0,
        max_pending: int | None = None,
        unready_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self.unready_after_s = DeskSettings().unready_after_s if unready_after_s is None else unready_after_s
        self.health = KafkaHealth(clock)
        self.backoff = ReconnectBackoff(clock=clock)
        self.probe_every_s = min(self.unready_after_s / 4, PROBE_EVERY_MAX_S)
        self.probe_timeout_ms = int(1000 * min(PROBE_TIMEOUT_MAX_S, max(1.0, self.probe_every_s)))
        self._probe_error = ""
        self._heard_from_kafka()
        self._connect_failed = False
        self.inbox = ReviewInbox()
        # A poll takes no more than the desk may hold, so the inbox never runs far ahead of the desk.
        cap = DeskSettings().max_pending if max_pending is None else max_pending
        polled = kafka.model_copy(update={"max_batch": max(1, min(kafka.max_batch, cap))})
        self.runner = StageRunner(Settings(kafka=polled, topics=topics), pass_through, service=SERVICE,
                                  input_route="review", group_id=group_id, flush_timeout_s=flush_timeout_s,
                                  sink=self.inbox)  # fmt: skip
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synpref-desk-kafka")
        self._closed = False
        self.source = KafkaReviewSource(self)
        self.sink = KafkaVerdictSink(self)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _opened(self, waits: bool = True) -> StageRunner:
        """The runner, connected; ReconnectPending while the back-off after a failure runs. A caller that does not
        `wait` (an annotator's decision: its write and commit) reconnects at once unless connecting itself failed:
        the tick polls every half second, decisions come at a human pace."""
        if self.runner.consumer is None:
            if self.backoff.wait_s() > 0 and (waits or self._connect_failed):
                raise ReconnectPending("the Kafka clients were closed after a failure; reconnecting after a back-off")
            try:
                self.runner.open()
            except Exception:
                self._connect_failed = True
                self._disconnect("could not connect to Kafka")
                raise
            self._connect_failed = False
            self._heard_from_kafka()  # open() read the topics' metadata
        return self.runner

    def _disconnect(self, why: str) -> None:
        """Close the clients (a producer made before the consumer failed too) and start the back-off."""
        delay = self.backoff.failed()
        log.warning("desk: %s; reconnecting in %.0fs (failure %d in a row)", why, delay, self.backoff.failures)
        try:
            self.runner.close()
        except Exception:
            log.exception("desk: closing the Kafka clients failed")

    def _tracked(self, operation: str, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` and record in `health` whether `operation` works."""
        try:
            result = fn(*args)
        except ReconnectPending:
            raise  # not a new failure: the one that closed the clients is still on record
        except Exception as exc:
            self.health.failed(operation, exc)
            raise
        self.health.succeeded(operation)
        return result

    # -- worker-thread side ----------------------------------------------------------------
    def _fetch(self, limit: int) -> list[tuple[PairRecord, Handle | None]]:
        runner = self._opened()
        consumer = runner.consumer
        if len(self.inbox.waiting) >= limit:
            # Full: keep polling so the group does not evict us, but read nothing new. A whole poll, not poll(0):
            # kafka-python 3.0.12 can only finish a group join inside a poll that waits for it (a consumer polling
            # with 0 stays REBALANCING and cannot commit). A rebalance that ends in this poll assigns the
            # partitions afresh, unpaused: what it then reads goes to the inbox.
            if consumer.assignment():
                consumer.pause(*consumer.assignment())
        elif consumer.paused():
            consumer.resume(*consumer.paused())
        # A commit that failed earlier is retried here: an idle desk polls nothing, so no checkpoint would.
        polled_to = dict(self.inbox.polled_to)
        try:
            polled = self._committing(runner.run_once)
        except DeliveryError:
            # The checkpoint flushes the inbox, which notes how far polling got, before it waits for the batch's
            # dead letters; they were not acknowledged, so the commits of decided pairs (_ack) must stop where the
            # last acknowledged batch ended, or they would move past the lost dead letters.
            self.inbox.polled_to = polled_to
            # The runner's outbox fails for good after a loss, so every later poll would raise again: the desk would
            # never read another pair while /healthz says ok. Fresh clients rejoin the group and read again from its
            # committed offsets, which stop before the lost dead letters. A producer refused for good fails the
            # same way after each reconnect: the back-off keeps that from happening every tick.
            self._disconnect("dead letters were not acknowledged; reading them again on fresh clients")
            raise
        self._commit_settled(runner)
        if polled:
            self._heard_from_kafka()
        else:
            self._probe_if_quiet(consumer)
        self.backoff.succeeded()
        return self.inbox.take(limit)

    def _heard_from_kafka(self) -> None:
        """The broker answered: no metadata request is needed for another probe_every_s."""
        self._heard_at = self.health.clock()
        self._probe_at = self._heard_at + self.probe_every_s
        self.health.succeeded("metadata")
        if self._probe_error:
            log.info("desk: Kafka answers again")
        self._probe_error = ""

    def _probe_if_quiet(self, consumer: Any) -> None:
        """Ask the broker for metadata once nothing was heard from it for probe_every_s; never raises."""
        now = self.health.clock()
        if now < self._probe_at:
            return
        self._probe_at = now + self.probe_every_s
        try:
            # One metadata round trip, KafkaTimeoutError after timeout_ms. Not topics(): kafka-python 3.0.12 waits for
            # it without a bound while no broker answers; bootstrap_connected() is True only while a bootstrap runs.
            consumer.bootstrap(timeout_ms=self.probe_timeout_ms, refresh=True)
        except Exception as exc:
            # Counted from the last sign of the broker: /readyz turns 503 about unready_after_s after it went.
            self.health.failed("metadata", exc, since=self._heard_at)
            repeated, self._probe_error = repr(exc) == self._probe_error, repr(exc)
            log.log(logging.DEBUG if repeated else logging.WARNING, "desk: Kafka did not answer a metadata request "
                    "(%r); asking again every %.0fs", exc, self.probe_every_s)  # fmt: skip
            return
        self._heard_from_kafka()

    def _commit_settled(self, runner: StageRunner) -> None:
        offsets = self.inbox.safe_offsets()
        self._committing(lambda: runner.commit(offsets))
        if offsets:
            self._heard_from_kafka()

    def _committing(self, step: Callable[[], T]) -> T:
        try:
            return step()
        except Exception:
            # The inbox counts its offsets as committed before the commit is sent; after a failure it must offer
            # them again, or they stay uncommitted until more pairs arrive and a restart re-reads decided pairs.
            self.inbox.committed.clear()
            raise

    def _write(self, routed: list[tuple[str, PairRecord]]) -> None:
        runner = self._opened(waits=False)
        messages = [self._fitting(runner, route, record) for route, record in routed]
        deliver(runner.producer, messages, runner.flush_timeout_s)
        if messages:
            self._heard_from_kafka()

    def _fitting(self, runner: StageRunner, route: str, record: PairRecord) -> Outgoing:
        """The decision's message to its route's topic; one over that topic's limit, never writable, would hold the
        desk's outbox for ever: it goes to the dead-letter topic instead (cut to fit), as the runner's outputs do."""
        out, dlq = encode_record(record, getattr(self.topics, route)), self.topics.dead_letter
        most = runner.settings.kafka.max_message_bytes  # the producer's own max_request_size too
        cap, dlq_cap = (min(most, runner.topic_limits.get(topic, most)) for topic in (out.topic, dlq))
        if out.size <= cap:
            return out
        why = f"{out.size} bytes, over the {cap}-byte message limit of topic {out.topic}"
        log.error("desk: the decision on pair %s is %s: written to %s instead", record.pair.id, why, dlq)
        return dead_letter_for(None, dlq, kind="too-large", reason=f"the desk's {route} decision is {why}",
                               service=SERVICE, record=record, max_bytes=dlq_cap)  # fmt: skip

    def _ack(self, handles: list[Any]) -> None:
        runner = self._opened(waits=False)
        self.inbox.settle(handles)
        self._commit_settled(runner)

    def _close(self) -> None:
        self.runner.close()

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
        consumer = self._opened(waits=False).consumer
        parts = consumer.partitions_for_topic(self.topics.review) or set()
        return {p: consumer.committed(TopicPartition(self.topics.review, p)) for p in sorted(parts)}


class KafkaReviewSource:
    """The ReviewSource side of KafkaDeskQueues: fetches from the review topic, acks by committing offsets."""

    def __init__(self, queues: KafkaDeskQueues) -> None:
        self.queues = queues

    async def fetch(self, limit: int) -> list[tuple[PairRecord, Any]]:
        """Up to `limit` records from the review topic with their (partition, offset) handles. Undecodable messages go
        to the dead-letter topic; limit 0 pauses the partitions and only polls (keep-alive). Nothing while the clients
        wait out a reconnect back-off (`reconnecting`)."""
        try:
            return await self.queues._run(self.queues._tracked, "read", self.queues._fetch, limit)  # type: ignore[return-value]
        except ReconnectPending:
            return []

    def reconnecting(self) -> bool:
        """Whether the clients are closed after a failure (a fetch returns nothing until the back-off has run out)."""
        return self.queues.runner.consumer is None

    def problem(self) -> str | None:
        """Why the desk cannot work: a Kafka operation failing for longer than desk.unready_after_s; None if none."""
        return self.queues.health.problem(self.queues.unready_after_s)

    async def ack(self, handles: list[Any]) -> None:
        """Mark these offsets settled and commit every partition up to its first unsettled offset."""
        await self.queues._run(self.queues._tracked, "commit", self.queues._ack, handles)

    async def close(self) -> None:
        """Close the shared queues (both sides)."""
        await self.queues.close()


class KafkaVerdictSink:
    """The VerdictSink side of KafkaDeskQueues: produces decisions to their routes' topics."""

    def __init__(self, queues: KafkaDeskQueues) -> None:
        self.queues = queues

    async def write(self, routed: list[tuple[str, PairRecord]]) -> None:
        """Produce each (route, record) to the route's topic and wait until all are acknowledged."""
        await self.queues._run(self.queues._tracked, "write", self.queues._write, routed)

    async def close(self) -> None:
        """Close the shared queues (both sides)."""
        await self.queues.close()
