"""The desk's Kafka backend: read the review topic, write the verified and discarded topics.

The desk runs on the shared StageRunner (shared/kafka/runner.py) with a pass-through stage and a sink, ReviewInbox,
that holds the records until the desk decides them. Delivery, step by step (at-least-once, like every stage):
  1. the runner polls the review topic (auto-commit off); an undecodable message, or a pair whose id no verdict could
     name (inbox.PAIR_ID), goes to the dead-letter topic through the runner's dead-letter helper and counts as settled;
  2. a pair stays open until its decision is produced through the runner's producer AND acknowledged (acks=all); a
     decision over its topic's message limit goes to the dead-letter topic instead, as the runner's outputs do (a
     limit lowered while the desk runs is learnt from the broker's refusal, StageRunner.learn_limit, for the retry);
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kafka.structs import TopicPartition

from synpref.services.desk.inbox import Handle, ReviewInbox, pass_through
from synpref.shared.config import DeskSettings, KafkaSettings, Settings, TopicSettings
from synpref.shared.kafka.batch import fit_to_topic
from synpref.shared.kafka.clients import DeliveryError, deliver
from synpref.shared.kafka.codec import Outgoing
from synpref.shared.kafka.runner import StageRunner, capped_backoff
from synpref.v1.pair_pb2 import PairRecord

log = logging.getLogger("synpref.desk.kafka")

SERVICE = "desk"
T = TypeVar("T")
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
        try:
            deliver(runner.producer, messages, runner.flush_timeout_s)
        except DeliveryError as exc:
            # A topic's max.message.bytes lowered while the desk runs: a decision the broker refuses as too large
            # would be refused on every retry. Learnt as the runner learns it for its own outputs, the lower limit
            # has the retry dead-letter it (_fitting); what was acknowledged is written again.
            runner.learn_limit(exc, f"writing the {len(messages)} decisions again dead-letters what is over it")
            raise
        if messages:
            self._heard_from_kafka()

    def _fitting(self, runner: StageRunner, route: str, record: PairRecord) -> Outgoing:
        """The decision's message to its route's topic, or its dead letter where it is over that topic's limit (as the
        runner's outputs are): never writable, it would hold the desk's outbox for ever."""
        dlq, most = self.topics.dead_letter, runner.settings.kafka.max_message_bytes  # the producer's max_request_size
        message, too_large = fit_to_topic(record, getattr(self.topics, route), max_bytes=most, service=SERVICE,
                                          topic_limits=runner.topic_limits, dead_letter_topic=dlq,
                                          what=f"the desk's {route} decision")  # fmt: skip
        if too_large is not None:
            log.error("desk: the decision on pair %s is %s: written to %s instead", record.pair.id, too_large, dlq)
        return message

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
